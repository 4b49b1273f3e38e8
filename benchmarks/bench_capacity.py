"""The embedded upstream under load, before vs after, measured by `fibreflow capacity` in one run: users held at
p95 < 2 s, p95 and first-token p95 at 8 users, tokens/s, on the demo champion (run `bash scripts/main.sh` first).

    python benchmarks/bench_capacity.py [--baseline REV] [--seconds 30]     # ~8 min on 2 cores

before: `fibreflow serve-model` of the baseline revision (default: the last one with static batching), installed
    into a folder of its own (pip --target) with its own configs, the champion as LoRA on its 4-bit base;
after: `fibreflow serve-model` of this checkout: continuous batching, the champion merged (model_server.merged_aliases).
Both read the same registry and artifacts (var/); the same users ask the same questions (configs/capacity.yaml's
mix) directly of each model server, one after the other, at 1, 2, 4 and 8 users.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_router import free_port, wait_up

ROOT = Path(__file__).resolve().parents[1]
FIBREFLOW = Path(sys.executable).parent / "fibreflow"
STATIC = "28b8830"  # the model server before continuous batching and merged serving (static batches, LoRA only)


def baseline_server(rev: str, work: Path) -> tuple[list[str], dict[str, str]]:
    """The command and environment of the baseline revision's model server: its code installed under `work`
    (first on sys.path), its own configs, this checkout's var/ (registry, artifacts)."""
    tree = work / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(work / "site"),
                    str(tree)], check=True)  # fmt: skip
    home = work / "home"
    home.mkdir()
    (home / "configs").symlink_to(tree / "configs")
    (home / "var").symlink_to(ROOT / "var")
    env = os.environ | {"PYTHONPATH": str(work / "site"), "FIBREFLOW_HOME": str(home)}
    return [sys.executable, "-c", "from fibreflow.cli.main import app; app()"], env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=STATIC)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "FIBREFLOW_UPSTREAM_KEY": ""}
    with tempfile.TemporaryDirectory() as tmp:
        old_cmd, old_env = baseline_server(args.baseline, Path(tmp))
        servers, ports = [], {"before": free_port(), "after": free_port()}
        try:
            for name, (cmd, e) in {"before": (old_cmd, old_env | {"FIBREFLOW_UPSTREAM_KEY": ""}),
                                   "after": ([str(FIBREFLOW)], env)}.items():  # fmt: skip
                servers.append(subprocess.Popen([*cmd, "serve-model", "--set", f"model_server.port={ports[name]}"],
                                                env=e, stdout=subprocess.DEVNULL))  # fmt: skip
                wait_up(f"http://127.0.0.1:{ports[name]}/health", timeout_s=600)
            import httpx

            champion = next(m["id"] for m in httpx.get(f"http://127.0.0.1:{ports['after']}/v1/models").json()["data"]
                            if m["root"].endswith("(merged)"))  # fmt: skip
            eps = [a for name, port in ports.items()
                   for a in ("--endpoint", f"{name}=http://127.0.0.1:{port}/v1@{champion}")]  # fmt: skip
            cmd = [str(FIBREFLOW), "capacity", *eps, "--concurrency", "1,2,4,8", "--duration", str(args.seconds),
                   "--json"]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        finally:
            for s in servers:
                s.terminate()
                s.wait(60)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(tmp) / "tree")],
                           check=False, capture_output=True)  # fmt: skip
    report = json.loads(out.stdout[out.stdout.index("{") :])
    steps = {(s["endpoint"], s["users"]): s for s in report["steps"]}
    print(f"champion {champion}; {args.seconds:.0f} s per step; MLflow run {report['run_id']}")
    print(
        "users | before p95 s | after p95 s | ratio | before TTFT p95 s | after TTFT p95 s | before tok/s | after tok/s"
    )
    for users in (1, 2, 4, 8):
        b, a = steps.get(("before", users)), steps.get(("after", users))
        if b is None or a is None:
            continue
        print(f"{users} | {b['p95_s']:.2f} | {a['p95_s']:.2f} | {b['p95_s'] / a['p95_s']:.1f}x | "
              f"{b['ttft_p95_s']:.2f} | {a['ttft_p95_s']:.2f} | "
              f"{b['tokens_per_s']:.1f} | {a['tokens_per_s']:.1f}")  # fmt: skip
    held = report["users_held"]
    print(f"users held at p95 < {report['target_p95_s']:g} s: before {held['before']}, after {held['after']}")


if __name__ == "__main__":
    main()
