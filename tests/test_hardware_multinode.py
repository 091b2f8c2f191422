"""The multinode profile, simulated: two "nodes" of one CPU process each meet at a torchrun c10d
rendezvous on localhost and train as the 2-process single-node profile does (same stage key, same
weights)."""

from __future__ import annotations

import socket

import pytest
from cli_runner import cli_env, run_cli, run_manifest, stage_dir, start_cli, tiny_overrides, weights


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_simulated_nodes_equal_the_two_process_single_node_run(tmp_path, model_cache):
    nodes_out, single_out = tmp_path / "nodes", tmp_path / "single"
    endpoint = f"127.0.0.1:{_free_port()}"
    node = [
        "hardware=multinode", "hardware.device=cpu", "hardware.backend=ddp", "hardware.precision=fp32",
        "hardware.num_processes=1", "hardware.num_nodes=2", f"hardware.rdzv_endpoint={endpoint}",
        "hardware.rdzv_id=simulated", "hardware.device_memory_gb=12",
    ]
    env = cli_env(MASTER_ADDR="127.0.0.1")
    procs = [
        start_cli(tiny_overrides(nodes_out, model_cache, *node, f"hardware.node_rank={rank}"), cwd=tmp_path,
                  log=tmp_path / f"node{rank}.log", env=env)
        for rank in (0, 1)
    ]
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert all("2 node(s)" in log for log in logs)
    manifest = run_manifest(nodes_out)
    assert manifest["hardware"]["world_size"] == 2 and manifest["hardware"]["num_nodes"] == 2

    single = run_cli(tiny_overrides(single_out, model_cache, "hardware=cpu_ddp2"), cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = stage_dir(nodes_out, "sft"), stage_dir(single_out, "sft")
    assert a.name == b.name  # one stage key: the world size counts, not how it is spread over nodes
    wa, wb = weights(a), weights(b)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wb) == 0.0
