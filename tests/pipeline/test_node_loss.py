"""A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head without CPUs and two
one-CPU worker nodes, each its own raylet): a node lost while it labels a shard, and a driver killed mid-stage."""

import json
import shutil
import signal
import subprocess
import sys
import time

import polars as pl
import psutil
import pytest

from lemb.pipeline.shards import read_stage


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, nodes
    c.shutdown()


def _label(run, config, executor="ray", address=None):
    cmd = [sys.executable, "-m", "lemb.cli", "label", "--run", str(run), "--executor", executor, "--quiet",
           "--config", str(config)]  # fmt: skip
    return cmd + (["--address", address, "--workers", "2"] if address else [])


def _block_config(tmp_path):
    config = tmp_path / "label.yaml"
    config.write_text("block_tokens: 10000000\nn_samples: 3\nper_candidate_samples: 1\n")  # a shard is one block
    return config


def _inside_a_block(stage_dir):
    """The progress record of a shard part of whose one block is done, or None."""
    for path in stage_dir.glob("part-*.progress.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if 0 < state["done"] < state["total"] and state["done"] % 1:
            return state
    return None


def _node_of(nodes, pid):
    """The cluster node whose raylet started process `pid` (a Ray worker is a child of its node's raylet)."""
    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    return next(n for n in nodes if n.all_processes["raylet"][0].process.pid in ancestors)


def _workers(marker, nodes):
    """Live lemb worker processes of the cluster's `nodes` (Ray names an actor's process after its class; a worker
    is a child of its node's raylet), not those of another Ray cluster on the machine."""
    raylets = {n.all_processes["raylet"][0].process.pid for n in nodes}
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in p.info["cmdline"] or []) and raylets & {a.pid for a in p.parents()}:
                found.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def _table(stage_dir):
    return pl.from_arrow(read_stage(stage_dir)).sort(["query_id", "key_id"])


@pytest.mark.slow
def test_a_node_lost_inside_a_label_shard_is_retried_on_the_other_node(labelled_run, tmp_path, cluster):
    c, nodes = cluster
    config = _block_config(tmp_path)
    for name in ("ref", "lost"):
        shutil.copytree(labelled_run / "retrieve", tmp_path / name / "retrieve")
    subprocess.run(_label(tmp_path / "ref", config, "local"), check=True, capture_output=True)
    stage_dir = tmp_path / "lost" / "label"
    proc = subprocess.Popen(_label(tmp_path / "lost", config, address=c.address), stderr=subprocess.PIPE)
    lost = None
    deadline = time.time() + 300
    while proc.poll() is None and lost is None and time.time() < deadline:
        state = _inside_a_block(stage_dir)
        if state:
            lost = _node_of(nodes, state["pid"])
            c.remove_node(lost, allow_graceful=False)  # its raylet and its workers die at once
        time.sleep(0.05)
    _, err = proc.communicate(timeout=600)
    assert lost is not None, "no shard was caught inside its block"
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"retry 1 of" in err  # the shard ran again, on the node that is left
    assert _table(stage_dir).equals(_table(tmp_path / "ref" / "label"))


@pytest.mark.slow
def test_a_killed_driver_leaves_no_lemb_actors_on_the_cluster(labelled_run, tmp_path, cluster):
    c, _ = cluster
    shutil.copytree(labelled_run / "retrieve", tmp_path / "run" / "retrieve")
    proc = subprocess.Popen(_label(tmp_path / "run", _block_config(tmp_path), address=c.address),
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while proc.poll() is None and not _inside_a_block(tmp_path / "run" / "label") and time.time() < deadline:
        time.sleep(0.05)
    nodes = c.list_all_nodes()
    assert _workers("_Worker", nodes), "no lemb worker was running"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while _workers("_Worker", nodes) and time.time() < deadline:
        time.sleep(0.5)
    assert not _workers("_Worker", nodes)  # the cluster removed the dead driver's actors; the cluster itself lives on
    assert all(n.all_processes["raylet"][0].process.poll() is None for n in c.list_all_nodes())
