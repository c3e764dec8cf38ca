"""The bodies of the Open Inference Protocol's HTTP infer call: the request read, the response written.

A request is JSON (KServe v2 REST):

    {"id": "...", "parameters": {"binary_data_output": true},
     "inputs": [{"name": "input", "datatype": "FP32", "shape": [N, 1, 8, 8], "data": [...]}],
     "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]}

with `data` flat (row-major) or nested, or, with the binary tensor data
extension (what tritonclient.http sends by default), raw little-endian bytes
after the JSON: the header Inference-Header-Content-Length gives the JSON's
length, and the input says how many bytes are its own with
"parameters": {"binary_data_size": n}. Outputs asked for with binary_data
(or, for those that do not say, the request's binary_data_output) are
answered the same way. Everything is checked before an array is made: types
(numbers, not strings or booleans; lists that are not ragged), and the
values' or bytes' count against the shape. Errors are ValueErrors naming the
field ("inputs[0].shape"); what the model then checks is infer_svc.oip's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from infer_svc import oip
from shared.rpc.convert import from_tensor
from shared.rpc.stubs.tandem_common_pb2 import Tensor

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIMENSION = 2**63 - 1  # a shape's entries are int64 on the protocol
MISSING = object()
TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "an object"}


@dataclass(frozen=True)
class InferRequest:
    id: str
    inputs: np.ndarray
    outputs: list[str]  # the outputs to answer, in order (oip.requested_outputs)
    binary_outputs: frozenset[str]  # those of them to answer as raw bytes


def read_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """The infer request `body` holds; `header_length`: its Inference-Header-Content-Length header."""
    text, binary = split_body(body, header_length)
    request = as_object(parse_json(text), "the request body")
    parameters = member(request, "parameters", dict, "parameters", {})
    binary_default = member(parameters, "binary_data_output", bool, "parameters.binary_data_output", False)
    outputs, binary_outputs = [], set()
    for index, entry in enumerate(member(request, "outputs", list, "outputs", [])):
        field = f"outputs[{index}]"
        output = as_object(entry, field)
        outputs.append(member(output, "name", str, f"{field}.name"))
        output_parameters = member(output, "parameters", dict, f"{field}.parameters", {})
        if member(output_parameters, "binary_data", bool, f"{field}.parameters.binary_data", binary_default):
            binary_outputs.add(outputs[-1])
    requested = oip.requested_outputs(outputs)
    if not outputs and binary_default:
        binary_outputs = set(requested)
    return InferRequest(
        id=member(request, "id", str, "id", ""),
        inputs=input_array(member(request, "inputs", list, "inputs"), binary),
        outputs=requested,
        binary_outputs=frozenset(binary_outputs),
    )


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(the JSON, the binary data after it)."""
    if header_length is None:
        return body, b""
    # Digits only, and no more than a length of this body can have: int() reads nothing longer.
    if not (header_length.isascii() and header_length.isdigit()) or len(header_length) > len(str(len(body))):
        length = None
    else:
        length = int(header_length)
    if length is None or length > len(body):
        raise ValueError(
            f"the {HEADER_LENGTH} header must be the length in bytes of the JSON that starts the "
            f"body, 0 to {len(body)}; got {header_length!r:.40}"
        )
    return body[:length], body[length:]


def parse_json(text: bytes):
    def no_constant(name: str):
        raise ValueError(f"the request's JSON holds {name}, which is not a JSON number")

    try:
        return json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"the request body is not JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(f"the request's JSON is not UTF-8: {error.reason} at byte {error.start}") from None
    except RecursionError:
        raise ValueError("the request's JSON nests lists or objects too deep to read") from None
    except ValueError as error:  # an integer of more digits than Python reads, NaN or Infinity
        raise ValueError(f"the request's JSON cannot be read: {error}") from None


def kind(value) -> str:
    """What a JSON value is, for messages: "a string", "true", "a list"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}
    return names.get(type(value), "null")


def as_object(value, field: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a JSON object; got {kind(value)}")
    return value


def member(document: dict, key: str, expected: type, field: str, default=MISSING):
    """`document[key]`, of the JSON type `expected` (bool is not int here); `default` if absent,
    or a ValueError naming `field` if there is no default."""
    if key not in document:
        if default is MISSING:
            raise ValueError(f"{field} is missing")
        return default
    value = document[key]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"{field} must be {TYPE_NAMES[expected]}; got {kind(value)}")
    return value


def input_array(inputs: list, binary: bytes) -> np.ndarray:
    """The request's one input as an array, from its JSON `data` or its bytes in `binary`."""
    oip.check_input_count(len(inputs))
    tensor = as_object(inputs[0], "inputs[0]")
    shape = member(tensor, "shape", list, "inputs[0].shape")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d <= MAX_DIMENSION for d in shape):
        raise ValueError(f"inputs[0].shape must be a list of integers from 0 to {MAX_DIMENSION}")
    dtype = oip.input_dtype(
        member(tensor, "name", str, "inputs[0].name"),
        member(tensor, "datatype", str, "inputs[0].datatype"),
        shape,
    )
    parameters = as_object(
        member(tensor, "parameters", dict, "inputs[0].parameters", {}), "inputs[0].parameters"
    )
    size = member(parameters, "binary_data_size", int, "inputs[0].parameters.binary_data_size", None)
    if (size is None) == ("data" not in tensor):
        raise ValueError(
            "inputs[0]: send its values in inputs[0].data or its bytes after the JSON with "
            "inputs[0].parameters.binary_data_size, exactly one of them"
        )
    if size is None:
        if binary:
            raise ValueError(
                f"the body holds {len(binary)} bytes after the JSON, and no input says they are its own"
            )
        return json_values(tensor["data"], shape, dtype)
    if not 0 <= size <= len(binary):
        raise ValueError(
            f"inputs[0].parameters.binary_data_size is {size} bytes; {len(binary)} follow the JSON"
        )
    if size < len(binary):
        raise ValueError(
            f"the body holds {len(binary)} bytes after the JSON; inputs[0].parameters.binary_data_size "
            f"accounts for {size}"
        )
    try:
        return from_tensor(Tensor(dtype=dtype, shape=shape, data=binary), field="inputs[0]")
    except ValueError as error:
        raise ValueError(f"inputs[0].parameters.binary_data_size={size}: {error}") from None


def json_values(data, shape: list[int], dtype: str) -> np.ndarray:
    """`data` (flat or nested lists of numbers) as an array of `shape`, once its count matches."""
    field = "inputs[0].data"
    if not isinstance(data, list):
        raise ValueError(f"{field} must be a list of numbers, flat (row-major) or nested; got {kind(data)}")
    values = data
    while any(isinstance(value, list) for value in values):  # one level of nesting at a time
        if not all(isinstance(value, list) for value in values):
            raise ValueError(f"{field} is ragged: lists and numbers side by side at the same depth")
        lengths = {len(value) for value in values}
        if len(lengths) > 1:
            raise ValueError(
                f"{field} is ragged: lists of {min(lengths)} to {max(lengths)} values at the same depth"
            )
        values = [item for value in values for item in value]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{field} must hold numbers; it holds {kind(value)}")
    if len(values) != math.prod(shape):
        raise ValueError(f"{field} holds {len(values)} values; shape {shape} needs {math.prod(shape)}")
    try:
        array = np.array(values, dtype=np.float64)
    except OverflowError:  # an integer beyond float64's range
        raise ValueError(f"{field} holds an integer beyond float64's range") from None
    with np.errstate(over="ignore"):  # beyond float32's range: inf, which the predictor refuses
        return array.astype(dtype).reshape(shape)


def infer_response(answer: oip.Answer, request: InferRequest) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON when binary outputs follow it (None: JSON only)."""
    outputs, binary = [], []
    for output in answer.outputs:
        tensor: dict = {"name": output.name, "datatype": output.datatype, "shape": list(output.array.shape)}
        if output.name in request.binary_outputs:
            binary.append(output.array.tobytes())
            tensor["parameters"] = {"binary_data_size": len(binary[-1])}
        else:
            tensor["data"] = output.array.ravel().tolist()
        outputs.append(tensor)
    document = {
        "model_name": answer.model_name,
        "model_version": answer.model_version,
        "id": request.id,
        "outputs": outputs,
    }
    text = json.dumps(document, separators=(",", ":")).encode()
    return (text + b"".join(binary), len(text)) if binary else (text, None)
