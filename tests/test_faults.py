"""Faults the field meets: a full disk, two processes on one run directory or table, SIGTERM, boards that hang or
answer garbage, a tracker that goes away, truncated and hand-edited files. Each is handled in one line with
nothing lost, and a re-run resumes."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from edgecompact import cli
from edgecompact.errors import StorageError
from edgecompact.storage import exclusive, lock_path, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", TVM_NUM_THREADS="1", PYTHONPATH=str(ROOT))
TINY = """from torch import nn


def net(num_classes=10, in_channels=3):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
"""


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgecompact.cli", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecompact.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600, check=False)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the process ended first: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.02)


def _one_line_error(stderr: str) -> str:
    """The error line a failed command ends with; no traceback before it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("edgecompact: "), stderr[-2000:]
    return last


def _history(path: Path) -> list[dict]:
    return torch.load(path, weights_only=True)["history"]["epochs"]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---- storage: atomic writes and the lock ------------------------------------------------------------------


def test_write_atomic_on_a_full_disk_keeps_the_old_file_and_names_the_path(tmp_path):
    path = tmp_path / "table.json"
    path.write_text("old")
    code = ("import resource, sys\nfrom edgecompact.storage import write_text_atomic\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))\n"
            "try:\n    write_text_atomic(sys.argv[1], 'x' * 1000)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], env=ENV, capture_output=True, text=True, check=True)
    assert r.stdout.startswith(f"StorageError cannot write {path}: file size limit exceeded")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]  # no temporary file left behind
    write_text_atomic(path, "x" * 1000)  # space again: the write goes through
    assert path.read_text() == "x" * 1000


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_is_released(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time\nfrom edgecompact.storage import exclusive\n"
            "with exclusive(sys.argv[1], 'run'):\n    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StorageError) as info, exclusive(run, "--out x"):
            pass
        assert str(info.value) == (f"--out x: in use by another edgecompact process (pid {holder.pid} on "
                                   f"{socket.gethostname()}; lock file {lock_path(run)}); wait for it to finish "
                                   "or choose another path")
    finally:
        holder.kill()
        holder.wait()
    with exclusive(run, "--out x"):  # the kernel dropped the killed holder's lock
        assert lock_path(run).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    assert not lock_path(run).exists()


def test_a_waiting_writer_blocks_until_the_holder_is_done_then_takes_the_lock(tmp_path):
    """`wait=True` (the per-user table cache two searches may need at once): the second process says whom it waits
    for, blocks while the first holds the lock, and goes on once it is released."""
    table = tmp_path / "table.json"
    code = ("import sys, time\nfrom edgecompact.storage import exclusive\n"
            "with exclusive(sys.argv[1], 'table'):\n    print('held', flush=True)\n    sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(table)], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    said, got = [], threading.Event()

    def second() -> None:
        with exclusive(table, "table.json", log=said.append, wait=True):
            got.set()

    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = threading.Thread(target=second)
        waiter.start()
        assert not got.wait(1.5)  # still held by the first process
        assert said == [(f"table.json: another edgecompact process (pid {holder.pid} on {socket.gethostname()}) "
                        "is writing it; waiting for it to finish")]
        holder.stdin.write("done\n")
        holder.stdin.flush()
        assert got.wait(30)  # released: the waiter holds it now
        waiter.join(30)
    finally:
        holder.kill()
        holder.wait()
    assert not lock_path(table).exists()


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path):
    run = tmp_path / "run"
    pid = _dead_pid()
    lock_path(run).write_text(f"{pid} {socket.gethostname()}\n")  # what a kill -9 leaves
    said = []
    with exclusive(run, "--out run", log=said.append):
        pass
    assert said == [f"--out run: taking over a stale lock (pid {pid} on {socket.gethostname()}, which no longer runs)"]
    assert not lock_path(run).exists()


# ---- truncated and hand-edited files: one line naming the file -----------------------------------------------


def _cli_error(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("[edgecompact]")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _table(tmp_path) -> dict:
    """A valid latency table (tiny model, host), made by profiling its grid with fake numbers."""
    from edgecompact.cost.latency import LatencyTable, layer_grid
    from edgecompact.models import load_model
    from edgecompact.structure import analyze
    from edgecompact.targets import get_target

    target = get_target("host")
    structure = analyze(load_model(str(_tiny(tmp_path)), num_classes=10, in_channels=3), (3, 8, 8), "tiny")
    table = LatencyTable.new(target, "measured", runtime="onnxruntime", statistic="x")
    from edgecompact.profiling import _merge

    _merge(table, layer_grid(structure, target.precision, target.channel_multiple))
    for e in table.entries.values():
        e.ms = [[0.1] * len(row) for row in e.ms]
    return table.to_dict()


def _tiny(tmp_path) -> str:
    (tmp_path / "tiny.py").write_text(TINY)
    return f"{tmp_path / 'tiny.py'}:net"


EDITS = {
    "truncated": lambda text, doc: text[: len(text) // 2],
    "wrong type": lambda text, doc: json.dumps({**doc, "entries": {k: {**v, "ms": "fast"} for k, v in
                                                                   doc["entries"].items()}}),
    "missing key": lambda text, doc: json.dumps({k: v for k, v in doc.items() if k != "provenance"}),
    "not an object": lambda text, doc: "[1, 2]",
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_broken_latency_table_is_named_by_profile_and_search(tmp_path, capsys, edit):
    doc = _table(tmp_path)
    path = tmp_path / "profiles" / "host-fp32-tiny.json"
    path.parent.mkdir()
    path.write_text(EDITS[edit](json.dumps(doc, indent=1), doc))
    line = _cli_error(capsys, "profile", "--model", _tiny(tmp_path), "--input-size", "8", "--out", str(path))
    assert line.startswith(f"edgecompact: error: {path}: malformed latency table")
    line = _cli_error(capsys, "search", "--model", _tiny(tmp_path), "--data", "digits", "--input-size", "8",
                      "--method", "uniform", "--profile", str(path), "--out", str(tmp_path / "run"))
    assert line.startswith(f"edgecompact: error: {path}: malformed latency table")


def _run_dir(tmp_path) -> Path:
    """A finished run directory of resnet20 on digits at 16x16 (an untrained uniform half-width model)."""
    from dataclasses import asdict

    from edgecompact.models import create_model
    from edgecompact.pipeline import SearchSpec
    from edgecompact.structure import ArchSpec, analyze, slim

    run = tmp_path / "run"
    run.mkdir()
    spec = SearchSpec(model="resnet20", data="digits", method="uniform", budget="0.5x", input_size=16)
    (run / "config.json").write_text(json.dumps(asdict(spec)))
    model = create_model("resnet20", num_classes=10, in_channels=1, input_size=16)
    structure = analyze(model, (1, 16, 16), "resnet20")
    keep = {g: list(range(max(1, w // 2))) for g, w in structure.groups.items()}
    (run / "structure.json").write_text(json.dumps(structure.to_dict()))
    ArchSpec("resnet20", {g: len(k) for g, k in keep.items()}, keep).save(run / "arch.json")
    torch.save({"model": slim(model, structure, keep).state_dict()}, run / "compact.pt")
    return run


ARCH_EDITS = {
    "truncated": lambda text: text[: len(text) // 2],
    "wrong type": lambda text: json.dumps({**json.loads(text), "widths": "half"}),
    "missing key": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "keep"}),
    "index out of range": lambda text: json.dumps({**json.loads(text), "keep": {
        g: [i + 1000 for i in k] for g, k in json.loads(text)["keep"].items()}}),
}


@pytest.mark.parametrize("edit", ARCH_EDITS)
def test_a_broken_arch_json_is_named_by_export(tmp_path, capsys, edit):
    run = _run_dir(tmp_path)
    arch = run / "arch.json"
    arch.write_text(ARCH_EDITS[edit](arch.read_text()))
    line = _cli_error(capsys, "export", str(run), "--out", str(tmp_path / "art"))
    assert line.startswith(f"edgecompact: error: {arch}:")


@pytest.mark.parametrize("name", ["structure.json", "config.json"])
def test_a_truncated_run_file_is_named_by_export(tmp_path, capsys, name):
    run = _run_dir(tmp_path)
    path = run / name
    path.write_text(path.read_text()[:40])
    line = _cli_error(capsys, "export", str(run), "--out", str(tmp_path / "art"))
    assert line.startswith(f"edgecompact: error: {path}:")


def _artifact(tmp_path) -> tuple[Path, dict]:
    from edgecompact.targets import get_target

    art = tmp_path / "art"
    art.mkdir()
    manifest = {"format": 1, "target": get_target("host").to_dict(), "precision": "fp32",
                "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"},
                "output": {"name": "output"}, "library": "model.so", "sha256": "0" * 64, "onnx": "model.onnx"}
    return art, manifest


MANIFEST_EDITS = {
    "truncated": lambda m: json.dumps(m)[:60],
    "missing key": lambda m: json.dumps({k: v for k, v in m.items() if k != "input"}),
    "wrong type": lambda m: json.dumps({**m, "input": {**m["input"], "shape": "1x1x8x8"}}),
    "unknown target key": lambda m: json.dumps({**m, "target": {**m["target"], "speed": "fast"}}),
}


@pytest.mark.parametrize("edit", MANIFEST_EDITS)
def test_a_broken_manifest_is_named_by_bench_and_the_runner(tmp_path, capsys, edit):
    from edgecompact import run

    art, manifest = _artifact(tmp_path)
    (art / "manifest.json").write_text(MANIFEST_EDITS[edit](manifest))
    line = _cli_error(capsys, "bench", str(art))
    assert line.startswith(f"edgecompact: error: {art / 'manifest.json'}: malformed manifest")
    if edit == "unknown target key":
        return  # the runner does not read the target
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    assert run.main([str(art), "--input", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {art / 'manifest.json'}: malformed manifest") and len(err.splitlines()) == 1


# ---- real processes: full disk, two writers, SIGTERM ----------------------------------------------------------


@contextmanager
def _paused(proc: subprocess.Popen):
    """SIGSTOP `proc` while the block runs, so that a check or a fault lands at a known point of its work."""
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def _limit_file_size(pid: int, size: int) -> None:
    """What a full disk does to a writer, without filling one: writes past `size` bytes fail (EFBIG; Python
    ignores SIGXFSZ)."""
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_full_disk_while_training_keeps_the_last_checkpoint_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "train"
    args = ["train", "--model", "resnet20", "--data", "digits", "--input-size", "16", "--limit", "400",
            "--epochs", "3", "--batch-size", "64", "--out", str(out)]
    ckpt = out / "checkpoint.pt"
    proc = _start(*args)
    _wait_for(proc, ckpt.is_file)
    with _paused(proc):
        _limit_file_size(proc.pid, 1000)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert _one_line_error(stderr) == (f"edgecompact: error: cannot write {ckpt}: file size limit exceeded; its last "
                                       "complete version is kept: free some space and re-run the same command to "
                                       "resume")
    before = _history(ckpt)
    assert 1 <= len(before) < 3
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]  # no partial file
    assert not lock_path(out).exists()  # released on the error
    r = _run(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    after = _history(ckpt)
    assert [e["epoch"] for e in after] == [0, 1, 2]
    assert after[: len(before)] == before  # resumed from the last good checkpoint


@pytest.mark.slow
def test_profile_table_has_one_writer_and_survives_a_full_disk(tmp_path, capsys):
    from edgecompact.cost.latency import LatencyTable

    table = tmp_path / "t.json"
    args = ["profile", "--model", _tiny(tmp_path), "--input-size", "8", "--out", str(table)]

    def measured() -> set:
        if not table.is_file():
            return set()
        t = LatencyTable.load(table)
        return {(str(k), ci, co, e.ms[i][j]) for k, e in t.entries.items() for i, j, ci, co in e.points()
                if e.ms[i][j] is not None}

    proc = _start(*args)
    _wait_for(proc, lock_path(table).exists)
    with _paused(proc):
        line = _cli_error(capsys, *args)  # a second profile of the same table, while the first runs
    assert line.startswith(f"edgecompact: error: {table}: in use by another edgecompact process (pid {proc.pid} on ")
    _wait_for(proc, lambda: len(measured()) >= 2)
    with _paused(proc):
        _limit_file_size(proc.pid, table.stat().st_size)  # the next save needs more room than the disk has
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert _one_line_error(stderr).startswith(f"edgecompact: error: cannot write {table}: file size limit exceeded")
    kept = measured()
    assert 2 <= len(kept) < 10
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__")
    assert left == ["t.json", "tiny.py"]  # no temporary or lock file
    r = _run(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    final = measured()
    assert len(final) == 10 and kept <= final  # nothing measured before the failure was lost or re-measured


@pytest.mark.slow
def test_full_disk_while_exporting_fails_in_one_line_and_a_rerun_exports(tmp_path):
    out = tmp_path / "art"
    args = ["export", _tiny(tmp_path), "--input-size", "8", "--num-classes", "10", "--out", str(out), "--runs", "10"]
    r = subprocess.run([sys.executable, "-m", "edgecompact.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600, check=False,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY)))
    assert r.returncode == 2
    assert _one_line_error(r.stderr) == (f"edgecompact: error: writing {out}: file size limit exceeded; free some "
                                         "space and re-run the same command")
    assert not (out / "manifest.json").exists()  # written last: the half-written artifact is not taken for one
    r = _run(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text())["library"] == "model.so"


SEARCH = ["search", "--model", "resnet20", "--data", "digits", "--input-size", "16", "--limit", "400", "--method",
          "uniform", "--budget", "0.5x", "--epochs", "1", "--search-epochs", "0", "--finetune-epochs", "3", "--final",
          "inherit", "--batch-size", "64", "--no-deploy"]


@pytest.mark.slow
def test_sigterm_keeps_the_checkpoint_a_second_search_is_refused_and_a_rerun_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*SEARCH, "--out", str(out)]
    ft = out / "finetune.pt"
    proc = _start(*args)
    _wait_for(proc, ft.is_file)
    with _paused(proc):
        line = _cli_error(capsys, *args)  # the same search again, while the first runs
        proc.send_signal(signal.SIGTERM)  # delivered when it resumes
    assert line == (f"edgecompact: error: --out {out}: in use by another edgecompact process (pid {proc.pid} on "
                    f"{socket.gethostname()}; lock file {lock_path(out)}); wait for it to finish or choose another "
                    "path")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert _one_line_error(stderr) == (f"edgecompact: interrupted by SIGTERM: finished epochs and measurements are "
                                       f"kept in {out}; re-run the same command to resume")
    before = _history(ft)
    assert 1 <= len(before) < 3
    assert not lock_path(out).exists()
    pid = _dead_pid()  # as if the interrupted run had been killed -9 instead: its lock is stale
    lock_path(out).write_text(f"{pid} {socket.gethostname()}\n")
    r = _run(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"taking over a stale lock (pid {pid} on" in r.stderr
    assert "training the baseline" not in r.stderr
    after = _history(ft)
    assert [e["epoch"] for e in after] == [0, 1, 2]
    assert after[: len(before)] == before
    assert (out / "report.json").is_file()


ONE_CONV = """from torch import nn


def net(num_classes=8, in_channels=3):
    return nn.Sequential(nn.Conv2d(in_channels, num_classes, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())
"""


@pytest.mark.slow
def test_sigterm_while_tuning_keeps_finished_steps_and_a_rerun_goes_on_from_them(tmp_path):
    import psutil

    (tmp_path / "one.py").write_text(ONE_CONV)  # one conv: one tuning task
    db, ledger = tmp_path / "db", tmp_path / "db" / "tuned_tasks.json"
    args = ["tune", f"{tmp_path / 'one.py'}:net", "--input-size", "8", "--trials-per-task", "2", "--chunk", "1",
            "--tuning-db", str(db)]
    proc = _start(*args)
    _wait_for(proc, ledger.is_file, timeout=600)  # the first step finished; the second is running
    tuners = psutil.Process(proc.pid).children(recursive=True)
    assert tuners
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert _one_line_error(stderr).startswith("edgecompact: interrupted by SIGTERM")
    assert list(json.loads(ledger.read_text()).values()) == [1]  # the finished step is kept
    _, alive = psutil.wait_procs(tuners, timeout=30)
    assert not alive  # the tuner and its workers stopped with it
    assert not lock_path(db).exists()
    r = _run(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [line for line in r.stderr.splitlines() if "trials (+" in line]
    assert len(steps) == 1 and ": 2/2 trials" in steps[0], steps  # went on from the kept step, not from 0
    assert list(json.loads(ledger.read_text()).values()) == [2]
    assert "[INFO]" not in r.stderr  # MetaSchedule's own log stays in the database's logs folder
    assert json.loads(r.stdout)[f"{tmp_path / 'one.py'}:net"]["tuned_tasks"] == 1


# ---- RPC: boards that hang or answer garbage, a tracker that goes away ------------------------------------------


class FakeBoard:
    """A 'board' registered at the tracker under `key` that accepts a session and then never answers ("hang")
    or answers garbage ("garbage")."""

    def __init__(self, tracker: tuple[str, int], key: str, mode: str):
        from tvm.rpc import base

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        t = socket.create_connection(tracker)
        t.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        assert struct.unpack("<i", base.recvall(t, 4))[0] == base.RPC_TRACKER_MAGIC
        base.sendjson(t, [base.TrackerCode.UPDATE_INFO, {"key": "server:" + key, "addr": [None, self.port]}])
        assert base.recvjson(t) == base.TrackerCode.SUCCESS
        base.sendjson(t, [base.TrackerCode.PUT, key, (self.port, f"{key}:fake{self.port}"), None])
        assert base.recvjson(t) == base.TrackerCode.SUCCESS
        self.tracker_conn = t
        threading.Thread(target=self._serve, args=(mode,), daemon=True).start()

    def _serve(self, mode: str) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if mode == "garbage":
                conn.recv(64)
                conn.sendall(b"\x17garbage" * 8)

    def close(self) -> None:
        for s in [*self.conns, self.tracker_conn, self.sock]:
            s.close()


def _start_tracker(port: int):
    from edgecompact import rpc as ec_rpc

    tracker_proc = ec_rpc.start_tracker(port=port, port_end=port + 100)
    return tracker_proc, ("127.0.0.1", tracker_proc.port)


def _wait_servers(tracker, key, n, timeout=30.0):
    from edgecompact import rpc as ec_rpc

    deadline = time.monotonic() + timeout
    while ec_rpc.servers_under_key(tracker, key) < n:
        assert time.monotonic() < deadline, f"{n} servers never registered under {key}"
        time.sleep(0.1)


def _tiny_grid(c_out: list[int]):
    from edgecompact.cost.latency import LayerKey

    return {LayerKey.parse("conv2d k3x3 s1x1 dense 8x8->8x8 fp32"): ([8], c_out)}


def _tiny_structure():
    from edgecompact.structure import Layer, Structure

    layer = Layer("c", "conv2d", (3, 3), (1, 1), False, 1, False, (8, 8), (8, 8), ["g"], "g", 8)
    return Structure("tiny", (8, 8, 8), {"g": 8}, [layer])


@pytest.mark.slow
def test_boards_that_hang_or_answer_garbage_lose_their_jobs_to_another_board(tmp_path):
    from edgecompact import rpc as ec_rpc
    from edgecompact.profiling import profile
    from edgecompact.targets import get_target

    tracker_proc, tracker = _start_tracker(20190)
    hang = FakeBoard(tracker, "ec-faulty", "hang")  # first registered: the tracker hands it out first
    garbage = FakeBoard(tracker, "ec-faulty", "garbage")
    server = ec_rpc.start_server(tracker, "ec-faulty", port=20400, port_end=20600)
    said: list[str] = []
    try:
        _wait_servers(tracker, "ec-faulty", 3)
        start = time.monotonic()
        table = profile(_tiny_structure(), get_target("host"), tmp_path / "t.json", grid=_tiny_grid([2, 4, 8]),
                        rpc=(*tracker, "ec-faulty"), runtime="tvm", progress=False, rpc_timeout=3.0,
                        log=said.append)
        took = time.monotonic() - start
    finally:
        server.terminate()
        hang.close()
        garbage.close()
        tracker_proc.terminate()
    assert all(v is not None and v > 0 for row in table.entries[next(iter(table.entries))].ms for v in row)
    assert any(line.startswith(f"RPC: board 127.0.0.1:{hang.port} did not answer within 3 s; layer conv2d")
               and line.endswith("goes to another board") for line in said), said
    assert any(line.startswith(f"RPC: board 127.0.0.1:{garbage.port} failed (") and "not TVM RPC server" in line
               for line in said), said
    assert took < 60


@pytest.mark.slow
def test_a_tracker_that_goes_away_stops_the_run_in_one_line_with_every_measurement_saved(tmp_path):
    from edgecompact import rpc as ec_rpc
    from edgecompact.cost.latency import LatencyTable
    from edgecompact.errors import ConfigError
    from edgecompact.profiling import profile
    from edgecompact.targets import get_target

    tracker_proc, tracker = _start_tracker(20690)
    server = ec_rpc.start_server(tracker, "ec-gone", port=20800, port_end=21000)
    out = tmp_path / "t.json"
    reported = []

    def tracker_dies(key, c_in, c_out, ms):
        reported.append((c_in, c_out, ms))
        if len(reported) == 1:
            tracker_proc.terminate()

    try:
        _wait_servers(tracker, "ec-gone", 1)
        with pytest.raises(ConfigError) as info:
            profile(_tiny_structure(), get_target("host"), out, grid=_tiny_grid([2, 4, 6, 8]),
                    rpc=(*tracker, "ec-gone"), runtime="tvm", progress=False, on_measure=tracker_dies)
    finally:
        server.terminate()
        tracker_proc.terminate()
    msg = str(info.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith(f"--rpc: cannot reach the RPC tracker at {tracker[0]}:{tracker[1]}")
    assert msg.endswith(f"the {len(reported)} points measured so far are saved in {out}: re-run the same command "
                        "to resume")
    entry = next(iter(LatencyTable.load(out).entries.values()))
    on_disk = {(ci, co, entry.ms[i][j]) for i, j, ci, co in entry.points() if entry.ms[i][j] is not None}
    assert on_disk == set(reported) and 1 <= len(on_disk) < 4
