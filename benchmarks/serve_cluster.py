"""Scale-out on a two-node Ray cluster of this machine: both nodes serve, and losing one costs no 500s.

    python benchmarks/serve_cluster.py --checkpoint runs/count_r0.safetensors --images runs/count/images/test
    python benchmarks/serve_cluster.py --smoke

Starts a Ray head (``ray start --head``) and a second Ray node (``ray start --address HEAD``), each
with ``--cpus`` CPUs of its own, then ``tocom serve MODEL --address HEAD --replicas 2`` at a fixed
r = 0, as docs/serving.md tells a user to deploy onto a cluster. It measures the closed-loop
capacity, then runs two phases of Poisson load at ``--load`` times that capacity:

1. ``both``: ``--seconds`` of load; which node answered each request (every replica sets the
   ``x-tocom-node`` header to its Ray node's id).
2. ``loss``: ``--seconds`` of load while, a third of the way in, every process of the second node
   is killed (SIGKILL to its session: the machine lost, not drained). Answers per node before and
   after, the codes, the longest wait, and the time from the loss to the first 200 answered by a
   replica Ray started anew on the head.

Ray's token authentication is on (``RAY_AUTH_MODE=token``), HTTP goes to 127.0.0.1 only, every
request has a client deadline (``--deadline-s``), the phases are bounded in requests and time, and
the script stops the service and both nodes by itself. Ray's own ports listen as ``ray start``
makes them (on all interfaces). Writes ``OUT.json`` and ``OUT.md`` (default
``docs/results/serve-cluster``). ``--smoke`` uses a tiny random ViT and short phases.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from serve_faults import (
    add_service_args,
    capacity,
    checked_args,
    commit,
    free_port,
    get,
    image_bodies,
    poisson,
    smoke_checkpoint,
    summary,
)

ROOT = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_service_args(p, seconds=45.0, max_requests=3000)
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs of each node")
    p.add_argument("--load", type=float, default=0.5, help="offered load, times the closed-loop capacity")
    args = checked_args(p, "serve-cluster")
    if args.smoke:
        args.seconds = min(args.seconds, 20.0)
    return args


class Node:
    """One ``ray start --block`` process in a session of its own: its session is the node."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]):
        self.log = log
        self.process = subprocess.Popen([*RAY, "start", *argv, "--block"], start_new_session=True, env=env,
                                        stdout=log.open("w"), stderr=subprocess.STDOUT)

    def pids(self) -> list[int]:
        out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
        return [int(pid) for pid, sid in (line.split() for line in out.splitlines())
                if int(sid) == self.process.pid]

    def kill(self) -> list[int]:
        """SIGKILL every process of the node at once (raylet, workers, actors)."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # ray start --block then stops the node's processes
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # whatever outlived it


PROBE = """import json, ray
ray.init(address={address!r}, log_to_driver=False)
print(json.dumps([{{"id": n["NodeID"][:12], "alive": n["Alive"],
                   "head": "node:__internal_head__" in n["Resources"]}} for n in ray.nodes()]))"""


def ask_cluster(script: str, address: str, env: dict[str, str]):
    """What ``script`` (formatted with the address) prints last as JSON, run in a fresh driver that
    joins the cluster (so this process never connects to Ray); None when it does not answer."""
    done = subprocess.run([sys.executable, "-c", script.format(address=address)], capture_output=True,
                          text=True, env=env, timeout=120)
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if done.returncode == 0 and lines else None


def cluster_nodes(address: str, env: dict[str, str]) -> list[dict] | None:
    """The cluster's nodes as Ray's GCS knows them (id prefix, alive, head)."""
    return ask_cluster(PROBE, address, env)


REPLICAS = """import json, ray
from ray import serve
ray.init(address={address!r}, log_to_driver=False)
states = {{}}
for app in serve.status().applications.values():
    for deployment in app.deployments.values():
        for state, n in deployment.replica_states.items():
            key = str(getattr(state, "value", state))
            states[key] = states.get(key, 0) + n
print(json.dumps(states))"""


def replica_states(address: str, env: dict[str, str]) -> dict[str, int] | None:
    """Replicas by state (RUNNING, STARTING, ...) as Ray Serve's controller reports them."""
    return ask_cluster(REPLICAS, address, env)


def wait_for_nodes(address: str, count: int, env: dict[str, str], timeout_s: float = 120.0) -> list[dict]:
    stop = time.time() + timeout_s
    while time.time() < stop:
        nodes = cluster_nodes(address, env)
        if nodes is not None and sum(n["alive"] for n in nodes) == count:
            return nodes
        time.sleep(2.0)
    raise SystemExit(f"the Ray cluster at {address} did not reach {count} nodes in {timeout_s:.0f} s")


def per_node(records: list[dict], head: str | None) -> dict[str, int]:
    """200 answers by node: "head", "second" (by the ids the two nodes answered with)."""
    nodes = Counter(r["node"] for r in records if r.get("status") == 200)
    return {("head" if node == head else "second" if node else "unknown"): n for node, n in nodes.items()}


def loss_report(records: list[dict], head: str | None) -> dict:
    lost = next(r for r in records if r.get("event") == "node-loss")
    before = [r for r in records if "status" in r and r["sent"] + r["wait_s"] < lost["at"]]
    after = [r for r in records if "status" in r and r["sent"] >= lost["at"]]
    in_flight = [r for r in records if "status" in r and r["sent"] < lost["at"] <= r["sent"] + r["wait_s"]]
    answered = sorted(r["sent"] + r["wait_s"] for r in after if r["status"] == 200)
    return {"at_s": round(lost["at"], 2), "pids_killed": len(lost["pids"]),
            "before": {**summary(before), "answers_by_node": per_node(before, head)},
            "in_flight": summary(in_flight),
            "after": {**summary(after), "answers_by_node": per_node(after, head)},
            "first_200_after_s": round(answered[0] - lost["at"], 2) if answered else None}


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    names = {"-1": "no answer in time", "0": "connection failed"}

    def codes(s: dict) -> str:
        return ", ".join(f"{names.get(k, k)}: {v}" for k, v in s["codes"].items()) or "-"

    def nodes(s: dict) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(s.get("answers_by_node", {}).items())) or "-"

    both, loss = result["both"], result["loss"]
    lines = ["# `tocom serve` on a two-node Ray cluster (generated by `benchmarks/serve_cluster.py`)", "",
             f"Model `{result['model']}`, fixed r = 0, 2 replicas, two Ray nodes of {result['cpus']} CPUs "
             f"on one machine; closed-loop capacity {result['capacity_rps']:.1f} req/s, offered "
             f"{result['rate_rps']:.1f} req/s, client deadline {result['deadline_s']:.0f} s; commit "
             f"{result['commit']}.", "",
             "| phase | requests | answers | 200s by node | longest wait (s) | 500s | no answer |",
             "|---|---|---|---|---|---|---|"]
    rows = [("both nodes", both), ("loss: answered before it", loss["before"]),
            ("loss: in flight at it", loss["in_flight"]), ("loss: sent after it", loss["after"])]
    for name, s in rows:
        lines.append(f"| {name} | {s['requests']} | {codes(s)} | {nodes(s)} | {s['longest_wait_s']} | "
                     f"{s['answers_500']} | {s['no_answer']} |")
    first = loss["first_200_after_s"]
    lines += ["", f"The second node was killed {loss['at_s']} s into the loss phase ({loss['pids_killed']} "
              "processes, SIGKILL). First 200 for a request sent after it: "
              f"{'none' if first is None else f'{first} s'} later. Nodes alive at the end: "
              f"{result['nodes_after']}; replicas then: {result['replicas_after']} (both running again "
              f"{result['two_replicas_running_after_s']} s after the loss, polled every few seconds); "
              f"`/healthz` after: {result['healthz_after']}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="tcl", dir="/tmp")  # short: Ray's socket paths are
    work = Path(tmp.name)
    model, checkpoint = smoke_checkpoint(work) if args.smoke else (args.model, args.checkpoint)
    bodies = image_bodies(args.images)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    gcs = free_port()
    address = f"127.0.0.1:{gcs}"
    http = free_port()
    url = f"http://127.0.0.1:{http}/v1/classify?k=1"
    head = Node(["--head", "--port", str(gcs), "--num-cpus", str(args.cpus), "--include-dashboard", "false",
                 "--ray-client-server-port", str(free_port()), "--temp-dir", str(work / "ray")],
                work / "head.log", env)
    second = server = None
    try:
        wait_for_nodes(address, 1, env)
        second = Node(["--address", address, "--num-cpus", str(args.cpus)], work / "second.log", env)
        head_id = next(n["id"] for n in wait_for_nodes(address, 2, env) if n["head"])
        cmd = [sys.executable, "-m", "tocom", "serve", model, "--checkpoint", checkpoint,
               "--fixed-degree", "0", "--address", address, "--replicas", "2", "--port", str(http),
               "--max-batch", "8", "--slo-ms", str(args.slo_ms)]
        server = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                                  stderr=(work / "serve.log").open("w"))
        stop = time.time() + args.start_timeout_s
        while get(f"http://127.0.0.1:{http}/healthz") != 200:
            if server.poll() is not None or time.time() > stop:
                raise SystemExit(f"tocom serve did not come up: {(work / 'serve.log').read_text()[-2000:]}")
            time.sleep(1.0)
        rate_max = asyncio.run(capacity(url, bodies))
        rate = args.load * rate_max
        both = asyncio.run(poisson(url, bodies, rate, args.seconds, args.max_requests, args.deadline_s, 0))
        ids = Counter(r["node"] for r in both if r.get("node"))
        events = [(args.seconds / 3, "node-loss")]
        loss = asyncio.run(poisson(url, bodies, rate, args.seconds, args.max_requests, args.deadline_s, 1,
                                   events, act=lambda what: {"pids": second.kill(), "wall": time.time()}))
        lost_at = next(r["wall"] for r in loss if r.get("event") == "node-loss")
        replicas, stop = replica_states(address, env), time.time() + 180
        while (replicas or {}).get("RUNNING", 0) < 2 and time.time() < stop:  # Ray starts the lost one anew
            time.sleep(2.0)
            replicas = replica_states(address, env)
        both_running_s = round(time.time() - lost_at, 1) if (replicas or {}).get("RUNNING", 0) >= 2 else None
        after = cluster_nodes(address, env)
        result = {"model": model, "checkpoint": Path(checkpoint).name, "commit": commit(), "cpus": args.cpus,
                  "capacity_rps": rate_max, "rate_rps": rate, "deadline_s": args.deadline_s,
                  "seconds": args.seconds, "node_ids": sorted(ids), "head_node": head_id,
                  "both": {**summary(both), "answers_by_node": per_node(both, head_id)},
                  "loss": loss_report(loss, head_id),
                  "nodes_after": None if after is None else sum(n["alive"] for n in after),
                  "replicas_after": replicas, "two_replicas_running_after_s": both_running_s,
                  "healthz_after": get(f"http://127.0.0.1:{http}/healthz")}
        write(args.out, result)
        print(args.out.with_suffix(".md").read_text())
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        for node in (second, head):
            if node is not None:
                node.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()
