"""shared/rpc/convert.py: numpy arrays <-> tandem.v1.Tensor, and what decoding refuses."""

import numpy as np
import pytest

from shared.dtypes import MODEL_DTYPES, TENSOR_DTYPES
from shared.rpc.convert import TensorError, from_tensor, to_tensor
from shared.rpc.stubs import tandem_common_pb2


def wire(tensor):
    """Through the wire format and back, as a server would receive it."""
    return tandem_common_pb2.Tensor.FromString(tensor.SerializeToString())


@pytest.mark.parametrize("dtype", TENSOR_DTYPES)
def test_round_trip_every_dtype(dtype):
    rng = np.random.default_rng(0)
    array = (rng.random((3, 4, 5)) * 100).astype(dtype)
    back = from_tensor(wire(to_tensor(array)))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_message_fields_are_numpy_name_shape_and_little_endian_bytes():
    tensor = to_tensor(np.array([[1.0, 2.0, 3.0]], dtype=np.float32))
    assert tensor.dtype == "float32"
    assert list(tensor.shape) == [1, 3]
    assert tensor.data == np.array([1, 2, 3], dtype="<f4").tobytes()


@pytest.mark.parametrize(
    "array",
    [
        np.float64(2.5),  # scalar: shape []
        np.zeros((0, 3), dtype=np.float32),  # empty
        np.arange(24, dtype=np.int64).reshape(2, 3, 4)[:, ::2, 1:],  # non-contiguous view
        np.arange(6, dtype=">f8").reshape(2, 3),  # big-endian input
        np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
        np.array([True, False, True]),
    ],
)
def test_round_trip_shapes_layouts_and_byte_orders(array):
    back = from_tensor(wire(to_tensor(array)))
    assert back.shape == array.shape
    assert back.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(back, array)


def test_big_endian_input_travels_little_endian():
    tensor = to_tensor(np.array([1], dtype=">u4"))
    assert tensor.dtype == "uint32" and tensor.data == b"\x01\x00\x00\x00"


def test_decoded_array_is_native_and_read_only():
    back = from_tensor(to_tensor(np.ones((2, 2), dtype=np.float32)))
    assert back.dtype.isnative
    assert not back.flags.writeable
    np.array(back)[0, 0] = 5  # a copy is writable


@pytest.mark.parametrize(
    "array",
    [
        np.array([1 + 2j]),
        np.array(["a"]),
        np.array([object()], dtype=object),
    ],
)
def test_to_tensor_refuses_dtypes_a_tensor_cannot_carry(array):
    with pytest.raises(TensorError, match="cannot travel as a Tensor"):
        to_tensor(array)


def test_unknown_dtype_names_the_field_and_lists_the_allowed():
    msg = tandem_common_pb2.Tensor(dtype="object", shape=[1], data=b"\x00" * 8)
    with pytest.raises(TensorError) as info:
        from_tensor(msg, allowed_dtypes=MODEL_DTYPES, field="inputs")
    assert "inputs.dtype" in str(info.value)
    assert "float32, float64" in str(info.value)
    assert "'object'" in str(info.value)


def test_allowed_dtypes_restricts_valid_dtypes():
    msg = to_tensor(np.zeros(3, dtype=np.int64))
    assert from_tensor(msg).dtype == np.int64
    with pytest.raises(TensorError, match=r"inputs\.dtype must be one of float32, float64"):
        from_tensor(msg, allowed_dtypes=MODEL_DTYPES, field="inputs")


def test_empty_dtype_is_refused():
    with pytest.raises(TensorError, match=r"tensor\.dtype"):
        from_tensor(tandem_common_pb2.Tensor(shape=[0]))


def test_negative_dimension_is_refused():
    msg = tandem_common_pb2.Tensor(dtype="float32", shape=[-1, 4], data=b"")
    with pytest.raises(TensorError, match=r"inputs\.shape .*negative.*\[-1, 4\]"):
        from_tensor(msg, field="inputs")


@pytest.mark.parametrize("size", [0, 23, 25, 48])
def test_wrong_byte_count_names_the_field_expected_and_actual(size):
    msg = tandem_common_pb2.Tensor(dtype="float32", shape=[2, 3], data=b"\x00" * size)
    with pytest.raises(TensorError) as info:
        from_tensor(msg, field="inputs")
    text = str(info.value)
    assert "inputs.data" in text and "24 bytes" in text and f"got {size}" in text


def test_huge_shape_is_a_byte_count_error_not_an_overflow():
    msg = tandem_common_pb2.Tensor(dtype="float64", shape=[2**62, 2**62], data=b"")
    with pytest.raises(TensorError, match=f"must hold {2**124 * 8} bytes"):
        from_tensor(msg)


def test_bool_bytes_other_than_0_and_1_are_refused():
    msg = tandem_common_pb2.Tensor(dtype="bool", shape=[2], data=b"\x01\x02")
    with pytest.raises(TensorError, match="0 or 1"):
        from_tensor(msg)


def test_scalar_needs_exactly_one_element():
    ok = tandem_common_pb2.Tensor(dtype="int32", shape=[], data=b"\x07\x00\x00\x00")
    assert from_tensor(ok) == 7 and from_tensor(ok).shape == ()
    with pytest.raises(TensorError, match="must hold 4 bytes"):
        from_tensor(tandem_common_pb2.Tensor(dtype="int32", shape=[], data=b""))
