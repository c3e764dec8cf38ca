"""The trainer client (shared/client/trainer.py), `tandem jobs ...` and `make demo`, against a real
trainer service on 127.0.0.1 over a real Redis (tests/conftest.py). The inference client
and `tandem predict --server` are in test_inference_client.py, `tandem jobs plot` in test_plot.py.

Jobs are small (an mlp with 16 hidden units on digits) and every wait is on
the trainer's own events: a watch ends when the job does.
"""

import gzip
import re
import signal
import struct
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from shared.cli import main
from shared.cli.jobs import watch_job
from shared.client import TrainerClient
from shared.data import load_dataset
from shared.embedded.redis_server import free_loopback_port
from shared.rpc.convert import job_state_name
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from tests.helpers import interruptible_module
from trainer_svc.config import TrainerConfig
from trainer_svc.server import TrainerServer

REPO = Path(__file__).resolve().parent.parent
SMALL_JOB = ["--preset", "mlp", "--hidden", "16", "--dataset", "digits"]


@pytest.fixture
def trainer(redis_url, redis_client):
    """A trainer service on a free port of 127.0.0.1, running one job at a time; its address."""
    config = TrainerConfig(
        redis_url=redis_url,
        listen="127.0.0.1:0",
        metrics_port=0,
        max_concurrent_jobs=1,
        resume_interrupted=False,
    )
    server = TrainerServer(config).start()
    address = f"127.0.0.1:{server.port}"
    try:
        with TrainerClient(address) as client:
            client.wait_until_ready(10)
        yield address
    finally:
        server.stop(grace=10)


@pytest.fixture
def model_name():
    """A model name of the test's own, so a shared REDIS_URL server holds no versions of it."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def jobs(trainer, capsys):
    """`jobs("list", "--state", "running")` runs `tandem jobs list --trainer ADDRESS --state running`;
    returns (exit code, stdout, stderr)."""

    def run(command: str, *args: str) -> tuple[int, str, str]:
        code = main(["jobs", command, "--trainer", trainer, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def run_to_end(client: TrainerClient, job: pb.Job) -> pb.Job:
    """Watch the job until it ends; the job as it ended."""
    *_, last = client.watch(job.job_id)
    return last.finished


def start_small_job(
    client: TrainerClient, model_name: str, dataset: str = "digits", epochs: int = 2
) -> pb.Job:
    return client.start_job(
        model_name, dataset, preset="mlp", hidden=[16], hyperparameters={"epochs": epochs}
    )


# ---------------------------------------------------------------- tandem jobs


def test_start_follow_trains_publishes_and_reports_success(jobs, model_name):
    code, out, err = jobs("start", "--model-name", model_name, *SMALL_JOB, "--epochs", "2", "--follow")
    assert (code, err) == (0, "")
    started = re.match(r"started job (\w+) \(QUEUED\)\n", out)
    assert started, out
    job_id = started[1]
    assert re.search(rf"^job {job_id}: {model_name} on digits, 2 epochs: (QUEUED|RUNNING)$", out, re.M)
    for epoch in (1, 2):
        assert re.search(rf"^epoch {epoch}/2  train loss \S+ acc \S+%  test loss \S+ acc \S+%", out, re.M)
        assert re.search(
            rf"^published {model_name} version {epoch} \(epoch {epoch}, step \d+, "
            r"test accuracy \S+%\)$",
            out,
            re.M,
        )
    assert re.search(
        rf"^job {job_id}: SUCCEEDED \(completed\), test accuracy \S+% after epoch 2, "
        r"latest version 2$",
        out,
        re.M,
    )


def test_list_watch_and_checkpoints_of_a_finished_job(jobs, trainer, model_name):
    with TrainerClient(trainer) as client:
        job = run_to_end(client, start_small_job(client, model_name))

    code, out, _ = jobs("list", "--model-name", model_name)
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == [
        "JOB",
        "STATE",
        "MODEL",
        "DATASET",
        "EPOCH",
        "TEST",
        "ACC",
        "VERSION",
        "CREATED",
    ]
    assert row.split()[:7] == [
        job.job_id,
        "SUCCEEDED",
        model_name,
        "digits",
        "2/2",
        f"{job.last_metrics.test_accuracy:.2%}",
        "2",
    ]
    assert job.job_id in jobs("list", "--state", "succeeded")[1]
    unfinished = jobs("list", "--state", "running", "--state", "queued", "--model-name", model_name)
    assert unfinished[1] == "no jobs\n"

    # Watching a finished job shows what happened and its end, and exits 0 for SUCCEEDED.
    code, out, _ = jobs("watch", job.job_id)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"job {job.job_id}: {model_name} on digits, 2 epochs: SUCCEEDED"
    assert [line.split("  ")[0] for line in lines[1:3]] == ["epoch 1/2", "epoch 2/2"]
    assert lines[3].startswith(f"job {job.job_id}: SUCCEEDED (completed)")

    code, out, _ = jobs("checkpoints", model_name)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["VERSION", "EPOCH", "STEP", "TEST", "ACC", "SIZE", "CREATED"]
    first, last = job.history
    assert rows[0].split()[:5] == ["2", "*", "2", str(last.step), f"{last.test_accuracy:.2%}"]
    assert rows[1].split()[:4] == ["1", "1", str(first.step), f"{first.test_accuracy:.2%}"]


def test_cancel_a_queued_and_a_running_job(jobs, trainer, model_name):
    with TrainerClient(trainer) as client:
        # The trainer runs one job at a time: the second waits behind the first, which
        # would run for hours.
        running = start_small_job(client, model_name, epochs=10_000)
        queued = start_small_job(client, model_name)

    code, out, _ = jobs("cancel", queued.job_id)
    assert (code, out) == (0, f"job {queued.job_id}: CANCELLED\n")
    code, out, _ = jobs("cancel", running.job_id)
    assert code == 0
    assert re.fullmatch(rf"job {running.job_id}: (CANCELLING|CANCELLED)\n", out)

    for job in (queued, running):
        code, out, _ = jobs("watch", job.job_id)
        assert code == 1
        assert re.search(rf"^job {job.job_id}: CANCELLED", out, re.M)


def test_a_refused_call_reports_its_status(jobs, tmp_path):
    spec = tmp_path / "bad.json"
    spec.write_text('{"input_shape": [1, 8, 8], "layers": [{"type": "dense", "units": 3}]}')
    code, out, err = jobs("start", "--model-name", "bad", "--spec", str(spec), "--dataset", "digits")
    assert (code, out) == (2, "")
    assert err.startswith("tandem: error: INVALID_ARGUMENT: layer 0 (dense)")

    code, _, err = jobs("watch", "no-such-job")
    assert code == 2
    assert err.startswith("tandem: error: NOT_FOUND: ")


def test_an_unreachable_trainer_is_unavailable(capsys):
    address = f"127.0.0.1:{free_loopback_port()}"  # nothing listens there
    assert main(["jobs", "list", "--trainer", address]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("tandem: error: UNAVAILABLE: ")
    assert f"no trainer answers at {address}" in err


def test_a_mid_epoch_checkpoint_says_which_epoch_its_test_accuracy_is_from(trainer, model_name, capsys):
    # Checkpoints by steps only. The trainer publishes the newest one pending, so which
    # are published is not fixed: the job runs until one of epoch 2 or later is, then stops.
    with TrainerClient(trainer) as client:
        job = client.start_job(
            model_name, "digits", preset="mlp", hidden=[16], hyperparameters={"epochs": 10_000},
            every_steps=10, every_epoch=False,
        )  # fmt: skip
        cancelled: list[pb.Job] = []

        def cancel_after_epoch_1(event: pb.JobEvent) -> None:
            if event.checkpoint.epoch >= 2 and not cancelled:
                cancelled.append(client.cancel(job.job_id))

        watch_job(client, job.job_id, on_checkpoint=cancel_after_epoch_1)
    published = re.findall(
        rf"^published {model_name} version \d+ \(epoch (\d+), step \d+(.*)\)$", capsys.readouterr().out, re.M
    )
    assert cancelled and published
    for epoch, accuracy in published:
        if epoch == "1":  # no epoch finished yet: no metrics
            assert accuracy == ""
        else:
            assert re.fullmatch(rf", test accuracy \S+% at the end of epoch {int(epoch) - 1}", accuracy)


@pytest.mark.parametrize("command", ["watch", "start"])
def test_ctrl_c_stops_the_watch_and_says_the_job_keeps_running(command, trainer, model_name):
    with TrainerClient(trainer) as client:
        if command == "watch":
            job_id = start_small_job(client, model_name, epochs=10_000).job_id
            argv = ["watch", job_id]
        else:
            argv = ["start", "--model-name", model_name, *SMALL_JOB, "--epochs", "10000", "--follow"]
        process = subprocess.Popen(
            interruptible_module("shared.cli", "jobs", *argv, "--trainer", trainer),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        watchdog = threading.Timer(60, process.kill)  # bounds the read if it never prints
        watchdog.start()
        try:
            first = process.stdout.readline()  # `job ID: ...` or `started job ID (QUEUED)`
            if command == "start":
                job_id = re.fullmatch(r"started job (\w+) \(QUEUED\)\n", first)[1]  # type: ignore[index]
                process.stdout.readline()  # its snapshot: the watch has begun
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=60)
        finally:
            watchdog.cancel()
            process.kill()
        assert process.returncode == 130
        assert err == (
            f"tandem: stopped watching; job {job_id} keeps running on the trainer "
            f"(`tandem jobs watch {job_id}` to follow it again, `tandem jobs cancel {job_id}` to stop it)\n"
        )
        assert job_state_name(client.get_job(job_id).state) in ("QUEUED", "RUNNING")
        client.cancel(job_id)


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    monkeypatch.delitem(sys.modules, "shared.cli.plot", raising=False)  # imported afresh, and failing
    assert main(["jobs", "plot", "some-job", "--out", str(tmp_path / "plot.png")]) == 2
    assert capsys.readouterr().err == (
        "tandem: error: `tandem jobs plot` needs matplotlib: pip install -e '.[plot]' in a checkout\n"
    )


# ---------------------------------------------------------------- the client


def test_an_uploaded_dataset_trains_exactly_as_the_original(trainer, model_name):
    digits = load_dataset("digits")
    name = f"digits-copy-{uuid.uuid4().hex[:8]}"
    arrays = {
        "x_train": digits.x_train.astype(">f4"),  # big-endian: sent little-endian all the same
        "y_train": digits.y_train,
        "x_test": digits.x_test,
        "y_test": digits.y_test,
    }
    with TrainerClient(trainer) as client:
        info = client.upload_dataset(name, arrays, piece_bytes=10_000)  # many pieces per array
        assert (
            info.name,
            list(info.input_shape),
            info.num_classes,
            info.train_size,
            info.test_size,
            info.source,
        ) == (name, [1, 8, 8], 10, 1618, 179, "upload")
        assert name in [dataset.name for dataset in client.list_datasets()]

        with pytest.raises(grpc.RpcError) as refused:
            client.upload_dataset(name, arrays)
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert client.upload_dataset(name, arrays, overwrite=True).name == name

        # Same seed, same data: the same metrics, bit for bit.
        original, copy = (
            run_to_end(client, start_small_job(client, model_name, dataset, epochs=1))
            for dataset in ("digits", name)
        )
    assert job_state_name(original.state) == job_state_name(copy.state) == "SUCCEEDED"
    assert [(m.train_loss, m.test_loss, m.test_accuracy) for m in copy.history] == [
        (m.train_loss, m.test_loss, m.test_accuracy) for m in original.history
    ]


def idx_file(path: Path, array: np.ndarray) -> Path:
    """`array` (uint8) as an IDX file: two zero bytes, type 0x08, the number of dimensions,
    each dimension as a big-endian uint32, then the bytes; gzipped if `path` ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def mnist_style_files(directory: Path) -> list[Path]:
    """The four IDX files of a tiny dataset: 40 train and 10 test 6x5 images of 3 classes."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (40, 6, 5)),
        "train-labels-idx1-ubyte.gz": np.arange(40) % 3,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 6, 5)),
        "t10k-labels-idx1-ubyte": np.arange(10) % 3,
    }
    return [idx_file(directory / name, array) for name, array in arrays.items()]


def test_upload_idx_files_then_list_them_and_train_on_them(jobs, model_name, tmp_path):
    name = f"idx-{uuid.uuid4().hex[:8]}"
    code, out, err = jobs("upload", name, *map(str, mnist_style_files(tmp_path)))
    assert (code, err) == (0, "")
    sent, header, row = out.splitlines()
    assert sent == "sent 0.0 MiB"  # not a terminal: no bar, one line
    assert header.split() == ["DATASET", "SOURCE", "SAMPLE", "SHAPE", "CLASSES", "TRAIN", "TEST"]
    assert row.split() == [name, "upload", "[1,", "6,", "5]", "3", "40", "10"]

    code, out, _ = jobs("datasets")
    assert code == 0
    assert re.search(r"^digits +builtin +\[1, 8, 8\] +10 +1618 +179$", out, re.M)
    assert re.search(rf"^{name} +upload +\[1, 6, 5\] +3 +40 +10$", out, re.M)

    start = ["--model-name", model_name, "--preset", "mlp", "--dataset", name, "--batch-size", "8"]
    code, out, err = jobs("start", *start, "--epochs", "2", "--follow")
    assert (code, err) == (0, "")
    assert re.search(rf"^job \w+: {model_name} on {name}, 2 epochs", out, re.M)


def test_upload_an_npz_file_and_its_directory_of_idx_files_with_overwrite(jobs, tmp_path):
    name = f"npz-{uuid.uuid4().hex[:8]}"
    digits = load_dataset("digits")
    x, y = np.concatenate([digits.x_train, digits.x_test]), np.concatenate([digits.y_train, digits.y_test])
    np.savez(tmp_path / "digits.npz", x=x, y=y)  # split 90/10 by the trainer
    code, out, _ = jobs("upload", name, str(tmp_path / "digits.npz"))
    assert code == 0
    assert out.splitlines()[-1].split() == [name, "upload", "[1,", "8,", "8]", "10", "1618", "179"]

    (tmp_path / "idx").mkdir()
    mnist_style_files(tmp_path / "idx")
    code, out, err = jobs("upload", name, str(tmp_path / "idx"))
    assert (code, out) == (2, "")
    assert err == (
        f"tandem: error: ALREADY_EXISTS: the trainer has a dataset {name!r} already; "
        "give --overwrite to replace it\n"
    )
    code, out, _ = jobs("upload", name, str(tmp_path / "idx"), "--overwrite")
    assert code == 0 and out.splitlines()[-1].split()[-3:] == ["3", "40", "10"]


@pytest.mark.parametrize(
    "files, message",
    [
        (lambda d: mnist_style_files(d)[:3], "; missing: t10k-labels-idx1-ubyte"),
        (lambda d: [*mnist_style_files(d)[:3], d / "labels.bin"], "; not one of them: {d}/labels.bin"),
        (lambda d: [idx_file(d / "x.npz", np.zeros(3))], "x.npz: cannot load as .npz: "),
        (lambda d: [d], "{d}: expected the IDX files train-images-idx3-ubyte, "),
        (lambda d: [d / "absent.npz"], "absent.npz: No such file or directory"),
    ],
    ids=["missing", "unknown", "not-npz", "empty-directory", "absent"],
)
def test_upload_refuses_bad_files_before_any_call(files, message, capsys, tmp_path):
    address = f"127.0.0.1:{free_loopback_port()}"  # nothing listens there: no call is made
    code = main(["jobs", "upload", "bad", *map(str, files(tmp_path)), "--trainer", address])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.startswith("tandem: error: ") and err.count("\n") == 1
    assert message.format(d=tmp_path) in err


def test_upload_dataset_reports_its_progress(trainer):
    digits = load_dataset("digits")
    arrays = {"x": digits.x_train, "y": digits.y_train}
    total = digits.x_train.nbytes + digits.y_train.nbytes
    told: list[tuple[int, int]] = []
    with TrainerClient(trainer) as client:
        name = f"progress-{uuid.uuid4().hex[:8]}"
        client.upload_dataset(name, arrays, piece_bytes=100_000, on_progress=lambda *p: told.append(p))
    sent = [s for s, _ in told]
    assert {t for _, t in told} == {total}
    assert sent[0] == 0 and sent[-1] == total and sent == sorted(sent) and len(sent) > 4


def test_list_jobs_follows_the_pages(trainer, model_name):
    with TrainerClient(trainer) as client:
        started = [client.cancel(start_small_job(client, model_name, epochs=10_000).job_id) for _ in range(3)]
        listed = client.list_jobs(model_name=model_name, page_size=2)
    assert [job.job_id for job in listed] == [job.job_id for job in reversed(started)]  # newest first


def test_wait_until_ready_is_bounded():
    with (
        TrainerClient(f"127.0.0.1:{free_loopback_port()}") as client,  # nothing listens there
        pytest.raises(grpc.RpcError) as waited,
    ):
        client.wait_until_ready(timeout=0.2)
    assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# ---------------------------------------------------------------- make demo


def test_demo_trains_through_the_trainer_and_predicts_through_the_inference_service():
    demo = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py")],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    accuracies = re.findall(r"^epoch +\d+/15 .* test loss \S+ acc (\S+)%", out, re.M)
    assert len(accuracies) == 15
    published = [int(v) for v in re.findall(r"^published digits-cnn version (\d+) \(epoch \d+", out, re.M)]
    assert len(published) == 15
    # After each publish, the inference service (started before training) serves that
    # version, or already the next one if training outran the look.
    served = [int(v) for v in re.findall(r"^inference now serves version (\d+) \(after \d+ ms\)$", out, re.M)]
    assert len(served) == len(published)
    assert all(s >= p for s, p in zip(served, published, strict=True)) and served == sorted(served)
    assert served[-1] == published[-1]
    assert re.search(r"^VERSION +EPOCH +STEP +TEST ACC +SIZE +CREATED$", out, re.M)
    assert re.search(r"^\d+ \* +15 +", out, re.M)  # the latest version: the last epoch's
    accuracy = re.search(r"^final test accuracy (\S+)%$", out, re.M)
    assert accuracy, out
    assert float(accuracy[1]) >= 97
    answer = re.search(
        r"^inference service: 179 held-out digits in one request, "
        r"accuracy (\S+)% \(\d+/179\), answered by version (\d+)$",
        out,
        re.M,
    )
    assert answer, out
    assert float(answer[1]) >= 97
    assert int(answer[2]) == published[-1]
