"""Reliability: killed builds, fsspec destinations, a Dask cluster, unsafe names."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from dataprep.build import BuildError, BuildOptions, build
from dataprep.shards import check_member, write_shard
from dataprep.verify import verify


def _opts(root, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("shard_size", 2)
    return BuildOptions(dataset="300w_lp", root=str(root), out=str(out), **kw)


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.tar"))}


@pytest.fixture(scope="module")
def reference(sample_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    build(_opts(sample_tree / "300W_LP", out))
    return _tars(out)


def test_sigkill_mid_build_then_rerun_is_byte_identical(sample_tree, tmp_path, reference):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dataprep.cli", "build", "--dataset", "300w_lp", "--root", str(sample_tree / "300W_LP"),
           "--out", str(out), "--shard-size", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(out.glob("*.tar"))) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it could be killed"
    # No final name ever holds a partial shard: every .tar present is complete and right.
    for name, data in _tars(out).items():
        assert data == reference_by_shard_size_one(sample_tree, tmp_path)[name]
    rc = subprocess.run(cmd, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    assert _tars(out) == reference_by_shard_size_one(sample_tree, tmp_path)
    assert verify(str(out)).ok


_LOKY_BUILD = """
import os, sys, time
from joblib import delayed
from dataprep.build import BuildOptions, _parallel

def shard_task():
    time.sleep(0.5)
    return os.getpid()

# the build's own pool: 2 workers, 1 shard (the other worker never gets one)
with _parallel(BuildOptions(dataset="aflw2000", root="raw", out="out", jobs=2)) as parallel:
    print(*parallel(delayed(shard_task)() for _ in range(1)), flush=True)
    time.sleep(600)
"""


def _children(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (Linux /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            data = stat.read_bytes()
        except OSError:
            continue
        if int(data[data.rindex(b")") + 2:].split()[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def test_loky_workers_end_with_a_build_killed_by_sigkill():
    """A build killed with kill -9 (or by the OOM killer) takes its loky worker processes with it,
    a worker that never got a shard too (they waited ~300 s for work, holding their memory)."""
    from dataprep.processes import end_with_build, pid_alive

    proc = subprocess.Popen([sys.executable, "-c", _LOKY_BUILD], stdout=subprocess.PIPE, text=True)
    workers: set[int] = set()
    try:
        busy = int(proc.stdout.readline())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(workers) < 2:
            workers = {pid for pid in _children(proc.pid)
                       if b"LokyProcess" in Path(f"/proc/{pid}/cmdline").read_bytes()}
            time.sleep(0.05)
        assert len(workers) == 2 and busy in workers and all(pid_alive(pid) for pid in workers), workers
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60  # they poll every second; the wait allows for a loaded machine
        while time.monotonic() < deadline and any(pid_alive(pid) for pid in workers):
            time.sleep(0.05)
        assert not any(pid_alive(pid) for pid in workers), "loky workers outlived their build"
    finally:
        proc.kill()
        for pid in workers:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    end_with_build(os.getppid())  # not a loky worker (the build's own process, threading backend): nothing happens
    end_with_build(os.getpid())
    assert pid_alive(os.getpid())


def test_processes_a_build_starts_for_a_local_dask_cluster_ignore_ctrl_c():
    """A terminal's Ctrl-C goes to the whole process group: the local dask cluster's processes
    (started in this block) leave it to the build, which stops them (each printed a traceback)."""
    from dataprep.processes import children_without_ctrl_c

    # a test run started in the background by a shell without job control inherits Ctrl-C ignored
    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT)
        probe = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"]
        with children_without_ctrl_c():
            inside = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
        outside = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
        assert (inside, outside) == ("True", "False")
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, started_with)


_REF1: dict[str, bytes] = {}


def reference_by_shard_size_one(sample_tree, tmp_path) -> dict[str, bytes]:
    if not _REF1:
        out = tmp_path / "ref1"
        build(_opts(sample_tree / "300W_LP", out, shard_size=1))
        _REF1.update(_tars(out))
    return _REF1


def test_fsspec_file_url_destination(sample_tree, tmp_path, reference):
    out = tmp_path / "viaurl"
    build(_opts(sample_tree / "300W_LP", f"file://{out}"))
    assert _tars(out) == reference
    assert verify(f"file://{out}").ok


def test_fsspec_memory_destination(sample_tree, reference):
    url = "memory://dataprep-test/build"
    manifest = build(_opts(sample_tree / "300W_LP", url))
    fs = fsspec.filesystem("memory")
    names = sorted(s["name"] for s in manifest["shards"])
    assert names == sorted(reference)
    for name in names:
        assert fs.cat_file(f"/dataprep-test/build/{name}") == reference[name]
    assert verify(url).ok
    fs.rm("/dataprep-test", recursive=True)


def test_unreachable_dask_scheduler_names_the_option(sample_tree, tmp_path):
    pytest.importorskip("dask.distributed")
    import dask

    from dataprep.build import BuildError

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(BuildError, match=r"^--scheduler tcp://127\.0\.0\.1:1: cannot reach a dask scheduler there "
                                             r"\(.*\); check the address"):
            build(_opts(sample_tree / "300W_LP", tmp_path / "out", backend="dask", scheduler="tcp://127.0.0.1:1"))


def test_dask_cluster_of_two_workers_is_byte_identical(sample_tree, tmp_path, reference):
    pytest.importorskip("dask.distributed")
    out = tmp_path / "dask"
    manifest = build(_opts(sample_tree / "300W_LP", out, jobs=2, backend="dask"))
    assert _tars(out) == reference
    assert manifest["counts"]["read"] == manifest["counts"]["written"] + manifest["counts"]["rejected"]


def test_loky_two_processes_is_byte_identical(sample_tree, tmp_path, reference):
    out = tmp_path / "loky"
    build(_opts(sample_tree / "300W_LP", out, jobs=2))
    assert _tars(out) == reference


@pytest.mark.parametrize("key", ["../evil", "/abs", "a.b", "a/b", ""])
def test_unsafe_member_names_are_refused(key):
    with pytest.raises(ValueError, match="unsafe"):
        check_member(key, "jpg")


def test_unsafe_sample_never_reaches_a_final_name(tmp_path):
    fs = fsspec.filesystem("file")
    with pytest.raises(ValueError):
        write_shard(fs, str(tmp_path / "x.tar"), [{"__key__": "../x", "jpg": b"1"}])
    assert not (tmp_path / "x.tar").exists()


def test_manifest_lists_no_pickles(sample_tree, tmp_path):
    build(_opts(sample_tree / "300W_LP", tmp_path))
    import tarfile

    for shard in tmp_path.glob("*.tar"):
        with tarfile.open(shard) as tar:
            exts = {m.name.split(".", 1)[1] for m in tar.getmembers()}
        assert exts <= {"jpg", "json", "pts.npy", "depth.png"}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["rejected"] == 0
    assert os.path.basename(manifest["shards"][0]["name"]) == manifest["shards"][0]["name"]


@pytest.fixture
def s3_server():
    """A local S3-compatible server (moto) on loopback, with one bucket."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # What a user does for their own S3-compatible store: fsspec's config for the s3 protocol.
    old_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir("dataprep-test")
    try:
        yield endpoint
    finally:
        if old_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = old_conf
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def test_s3_destination_on_a_local_server(sample_tree, reference, s3_server):
    manifest = build(_opts(sample_tree / "300W_LP", "s3://dataprep-test/build"))
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    names = sorted(s["name"] for s in manifest["shards"])
    assert names == sorted(reference)
    for name in names:
        assert fs.cat_file(f"dataprep-test/build/{name}") == reference[name]
    assert not fs.glob("dataprep-test/build/*.tmp")
    assert verify("s3://dataprep-test/build").ok


def test_unreachable_s3_destination_is_one_error(sample_tree, monkeypatch):
    """An --out store that cannot be reached stops the build with one line naming it (it was a
    135-line botocore traceback)."""
    pytest.importorskip("s3fs")
    for k, v in {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(fsspec.config.conf, "s3", {
        "endpoint_url": "http://127.0.0.1:9",  # nothing listens on the discard port
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}, "skip_instance_cache": True})
    with pytest.raises(BuildError, match=r"^--out s3://dataprep-test/x: cannot reach it \(EndpointConnectionError"):
        build(_opts(sample_tree / "300W_LP", "s3://dataprep-test/x"))
