"""Reliability (issue 12): keys follow content, kills and full disks leave nothing behind that the rerun
does not remove, and a job waiting on another's stage says who it waits for and can stop waiting."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import cli_env, complete_checkpoints, single_thread, stage_dir, tiny_overrides, weights
from fault_cli import install

from align_runner import api
from align_runner.fsutil import TEMP_NAME
from align_runner.models import fingerprint
from align_runner.pipeline.runner import plan
from align_runner.pipeline.store import DONE, LOCKS, StageStore, StoreError


def _hits(result) -> dict[str, bool]:
    return {s.name: s.cache_hit for s in result.stages}


def _run(overrides: list[str]):
    with single_thread():
        return api.run(overrides)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def _temps(root: Path) -> list[str]:
    return [name for name in _tree(root) if TEMP_NAME.search(name)]


# ----------------------------------------------------------------------------- 3. keys trust content
def test_file_digests_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights-1")
    (model / ".cache").write_text("hidden files are not content")
    calls = []
    digest = fingerprint.file_digest
    monkeypatch.setattr(fingerprint, "file_digest", lambda path: calls.append(path.name) or digest(path))

    first = fingerprint.dir_fingerprint(model, tmp_path / "cache")
    # by hand: name, size and sha256 of each non-hidden file, in name order
    expected = hashlib.sha256()
    for name, data in [("config.json", b"{}"), ("model.safetensors", b"weights-1")]:
        expected.update(f"{name}\0{len(data)}\0{hashlib.sha256(data).hexdigest()}\0".encode())
    assert first == expected.hexdigest() and sorted(calls) == ["config.json", "model.safetensors"]
    cached = json.loads((tmp_path / "cache" / fingerprint.DIGEST_CACHE).read_text())
    weights_file = str((model / "model.safetensors").resolve())
    assert cached[weights_file][0] == 9 and cached[weights_file][2] == hashlib.sha256(b"weights-1").hexdigest()

    calls.clear()  # a later run: nothing is read again
    assert fingerprint.dir_fingerprint(model, tmp_path / "cache") == first and calls == []
    os.utime(model / "model.safetensors", ns=(1, 1))  # touched, same bytes: read again, same print
    assert fingerprint.dir_fingerprint(model, tmp_path / "cache") == first and calls == ["model.safetensors"]
    calls.clear()
    (model / "model.safetensors").write_bytes(b"weights-2")  # overwritten in place, same size
    assert fingerprint.dir_fingerprint(model, tmp_path / "cache") != first and calls == ["model.safetensors"]


def test_overwriting_a_local_checkpoint_in_place_recomputes_its_stages(tmp_path, model_cache):
    from safetensors.torch import load_file, save_file

    from align_runner.models.loading import resolve_source

    local = tmp_path / "my-model"
    shutil.copytree(resolve_source(api.compose(["model=tiny"]).model.source, cache_dir=model_cache), local)
    overrides = ["model=local", f"model.source.name_or_path={local}",
                 *tiny_overrides(tmp_path / "outputs", model_cache, "train.max_steps=2")[1:]]
    first = _run(overrides)
    assert _hits(_run(overrides)) == {"data_prep": True, "sft": True}

    tensors = load_file(str(local / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(local / "model.safetensors"), metadata={"format": "pt"})
    again = _run(overrides)
    # the tokenizer comes from the model dir, so data_prep's key follows the model's content too
    assert _hits(again) == {"data_prep": False, "sft": False}
    assert all(a.key != b.key for a, b in zip(first.stages, again.stages))


def test_an_eval_stage_is_keyed_by_what_it_evaluates_not_by_its_name(tiny):
    sft = _run(tiny)  # eval_after evaluates the SFT output
    dpo = {p.spec.name: p for p in plan(api.compose([*tiny, "algorithm=dpo"]), StageStore(Path(tiny[1].split("=", 1)[1]) / "store"))}
    # the DPO pipeline's eval_before evaluates that same SFT output: the same key, already stored
    assert dpo["eval_before"].spec.model_from == "sft"
    assert dpo["eval_before"].key == sft.stage("eval_after").key and dpo["eval_before"].cached
    assert dpo["eval_after"].key != sft.stage("eval_after").key


# ------------------------------------------------------------------------------------ 5. leftovers
def _fault_cli(fault: str, overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fault_cli", fault, *overrides], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, model_cache):
    """The store of an uninterrupted run of the pipeline the kill tests interrupt."""
    out = tmp_path_factory.mktemp("clean") / "outputs"
    _run(tiny_overrides(out, model_cache, "train.save_every=2"))
    return out / "store"


@pytest.mark.parametrize(
    "fault, leftover",
    [("kill-model-save", r"model\.tmp-\d+"), ("kill-manifest", r"\.manifest\.json\.\d+\..+\.tmp"), ("kill-done", r"\.DONE\.\d+\..+\.tmp")],
)
def test_a_kill_mid_write_leaves_nothing_once_the_stage_is_rerun(tmp_path, model_cache, clean, fault, leftover):
    out = tmp_path / "outputs"
    overrides = tiny_overrides(out, model_cache, "train.save_every=2")
    killed = _fault_cli(fault, overrides, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    sft = stage_dir(out, "sft")
    assert [n for n in os.listdir(sft) if re.fullmatch(leftover, n)] and not (sft / DONE).exists()
    assert complete_checkpoints(sft) == [2]  # step checkpoints outlive everything but DONE (none at the last step)
    assert (out / "store" / LOCKS / f"{sft.name}.holder").exists()  # the killed holder's record

    again = _run(overrides)
    assert _hits(again) == {"data_prep": True, "sft": False}
    # exactly the files of an uninterrupted run: no temp, no checkpoint, no holder record
    assert _tree(out / "store") == _tree(clean) and _temps(out / "store") == []
    # resumed from its last checkpoint, so bitwise the uninterrupted run's model
    ref = weights(stage_dir(clean.parent, "sft"))
    assert all(torch.equal(t, ref[name]) for name, t in weights(sft).items())


def test_checkpoints_go_only_after_done_and_a_later_hit_drops_what_a_kill_left(tmp_path, monkeypatch):
    import align_runner.pipeline.store as store_module

    store, key = StageStore(tmp_path / "store"), "ab" * 32
    ckpt = store.begin("sft", key, force=False) / "ckpt" / "step-2"
    ckpt.mkdir(parents=True)

    def killed(path, **_):
        raise KeyboardInterrupt("killed while deleting checkpoints")

    monkeypatch.setattr(store_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        store.finish("sft", key, {"metrics": {}})
    assert store.is_done("sft", key) and ckpt.is_dir()  # DONE first: the result is kept
    monkeypatch.undo()
    store.tidy("sft", key)  # what the runner does on a cache hit
    assert _tree(store.stage_dir("sft", key)) == ["DONE", "manifest.json"]


def _hold(store: Path, kind: str, key: str) -> subprocess.Popen:
    """Another job computing a stage: holds its lock until killed."""
    code = ("import sys, time\nfrom align_runner.pipeline.store import StageStore\n"
            "with StageStore(sys.argv[1]).computing(sys.argv[2], sys.argv[3], stage=sys.argv[2], timeout=None):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(store), kind, key], env=cli_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_wait_names_the_holder_and_lock_timeout_ends_it(tiny, caplog):
    store = Path(tiny[1].split("=", 1)[1]) / "store"
    key = plan(api.compose(tiny), StageStore(store))[0].key
    holder = _hold(store, "data_prep", key)
    try:
        with caplog.at_level("INFO", logger="align_runner"), pytest.raises(StoreError) as error:
            _run([*tiny, "pipeline.lock_timeout=0.5"])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    who = f"pid {holder.pid} on host {platform.node()} (stage data_prep, since "
    assert f"stage data_prep (data_prep-{key[:12]}) is being computed by {who}" in caplog.text
    assert "waiting for it (at most 0.5s, pipeline.lock_timeout)" in caplog.text
    assert re.fullmatch(
        rf"stage 'data_prep': gave up after 0.5s \(pipeline.lock_timeout\) waiting for {re.escape(who)}.+\) to finish "
        rf"{re.escape(str(store))}/data_prep-{key[:12]} \(lock .+\.lock\); rerun when it is done, or stop it",
        str(error.value),
    )
    # a killed holder blocks no one: the kernel freed its lock, and its record is replaced, then removed
    with StageStore(store).computing("data_prep", key, stage="data_prep", timeout=0):
        assert json.loads((store / LOCKS / f"data_prep-{key[:12]}.holder").read_text())["pid"] == os.getpid()
    assert not (store / LOCKS / f"data_prep-{key[:12]}.holder").exists()


# ------------------------------------------------------------------------------- 6. disk failures
def test_no_space_in_a_model_save_is_one_line_naming_the_path_and_the_rerun_works(tmp_path, model_cache, monkeypatch):
    out = tmp_path / "outputs"
    overrides = tiny_overrides(out, model_cache)
    install("no-space", monkeypatch.setattr)
    with pytest.raises(StoreError) as error:
        _run(overrides)
    sft = stage_dir(out, "sft")
    assert str(error.value) == (
        f"stage 'sft': cannot write {sft}: No space left on device [ENOSPC]; free space or fix the permissions "
        "(or point paths.outputs / paths.store elsewhere) and rerun: finished stages are reused"
    )
    assert not (sft / DONE).exists() and not (sft / "model").exists() and _temps(out / "store") == []
    assert [p.suffix for p in (out / "store" / LOCKS).iterdir()] in ([], [".lock", ".lock"])  # no holder left

    monkeypatch.undo()
    assert _hits(_run(overrides)) == {"data_prep": True, "sft": False} and (sft / DONE).exists()


@pytest.mark.parametrize(
    "fault, message",
    [("no-space", r"stage 'sft': cannot write \S+/store/sft-[0-9a-f]{12}: No space left on device \[ENOSPC\]; "),
     ("read-only", r"stage 'data_prep': cannot write \S+/store/\.locks: Read-only file system \[EROFS\]; ")],
)
def test_disk_failures_exit_1_with_one_line_and_no_traceback(tmp_path, model_cache, fault, message):
    run = _fault_cli(fault, tiny_overrides(tmp_path / "outputs", model_cache), tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr + run.stdout
    assert re.match("align_runner: error: " + message, run.stderr.splitlines()[-1])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_a_read_only_store_is_one_line_naming_it(tmp_path, model_cache):
    store = tmp_path / "outputs" / "store"
    store.mkdir(parents=True)
    store.chmod(0o555)
    try:
        with pytest.raises(StoreError, match=rf"^stage 'data_prep': cannot write {re.escape(str(store))}/\S+: Permission denied \[EACCES\]; "):
            _run(tiny_overrides(tmp_path / "outputs", model_cache))
    finally:
        store.chmod(0o755)


@pytest.fixture
def small_disk(tmp_path):
    """A real 512 KiB tmpfs (root with mount rights only): room for data_prep, not for a model."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with mount rights)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_during_the_weights_write_is_one_line(tmp_path, model_cache, small_disk):
    # safetensors reports ENOSPC as its own exception type, not an OSError: it must read the same
    out = small_disk / "outputs"
    with pytest.raises(StoreError, match=r"^stage 'sft': cannot write \S+: No space left on device \[ENOSPC\]; "):
        _run(tiny_overrides(out, model_cache))
    sft = stage_dir(out, "sft")
    assert not (sft / DONE).exists() and _temps(out / "store") == []


def test_a_really_read_only_store_is_one_line(tmp_path, model_cache, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    # the run dir under paths.outputs is the first thing written
    with pytest.raises(StoreError, match=rf"^run dir: cannot write {re.escape(str(small_disk))}/\S+: Read-only file system \[EROFS\]; "):
        _run(tiny_overrides(small_disk / "outputs", model_cache))
