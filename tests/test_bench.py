"""The benchmark CLI (python -m bn_ext.bench): a small run end to end, and the pieces that decide
its numbers. Nothing here asserts a speed: timings on a shared machine are not test material."""

import json
import subprocess
import sys

import pytest
import torch

import bn_ext
from bn_ext.bench.__main__ import MODES, geomean, interleaved_times, two_reads_case, two_reads_fns
from bn_ext.bench.cases import Case
from conftest import repo_env


def test_interleaved_times_take_turns_and_pool_per_function():
    calls = []
    fns = [lambda k=k: calls.append(k) for k in range(3)]
    times = interleaved_times(fns, "cpu", repeats=4, warmup=1)
    assert [len(t) for t in times] == [4, 4, 4]
    assert all(v >= 0 for t in times for v in t)
    timed = calls[-12:]  # after warm-up: one call of each per turn, in order
    assert timed == [0, 1, 2] * 4


def test_geomean():
    assert geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert geomean([]) != geomean([])  # nan for no cases


def test_bench_cli_writes_results_that_name_the_machine(tmp_path):
    env = repo_env()
    cmd = [
        sys.executable,
        "-m",
        "bn_ext.bench",
        "--device",
        "cpu",
        "--shapes",
        "resnet50.layer3",
        "--dtype",
        "float32,bfloat16",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "2",
        "--out",
        str(tmp_path),
        "--tag",
        "t",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "geomean speedup" in run.stdout
    with open(tmp_path / "bench-t.json") as f:
        data = json.load(f)
    machine, rows = data["machine"], data["results"]
    for key in ("cpu", "threads", "torch", "bn_ext_commit", "bn_ext_cpu_kernels", "allocator"):
        assert key in machine
    assert machine["threads"] >= 1 and machine["bn_ext_cpu_kernels"] in ("default", "avx2", "avx512bf16")
    # 2 layouts x 2 dtypes x 3 modes, each once however many rounds pooled it
    assert len(rows) == 2 * 2 * len(MODES)
    assert {(r["layout"], r["dtype"], r["mode"]) for r in rows} == {
        (lay, dt, m) for lay in ("contiguous", "channels_last") for dt in ("float32", "bfloat16") for m in MODES
    }
    for r in rows:
        assert r["parity"] == "ok"
        assert r["speedup"] == pytest.approx(r["torch_ms"] / r["bn_ext_ms"])
        assert r["tensor_MB"] == pytest.approx(4 * 1024 * 14 * 14 * (4 if r["dtype"] == "float32" else 2) / 1e6)
        assert r["two_reads_ms"] is None and r["two_reads_fraction_of_copy"] is None  # 3.2 MB: below the target's 8
    # the .txt is the printed table, rendered from the JSON alone (--render redoes it)
    with open(tmp_path / "bench-t.txt") as f:
        table = f.read()
    assert (tmp_path / "bench-t.png").exists()
    assert table.count(" ok\n") == len(rows) and "geomean speedup" in table
    (tmp_path / "bench-t.txt").unlink()
    render = [sys.executable, "-m", "bn_ext.bench", "--render", str(tmp_path / "bench-t.json")]
    assert subprocess.run(render, capture_output=True, text=True, env=env, timeout=600).returncode == 0
    assert (tmp_path / "bench-t.txt").read_text() == table


def test_filtered_run_never_overwrites_whole_suite_results(tmp_path):
    # benchmarks/bench-cpu-<build>.* hold a whole suite; a run with --shapes/--mode must write elsewhere
    env = repo_env()
    cmd = [
        sys.executable,
        "-m",
        "bn_ext.bench",
        "--device",
        "cpu",
        "--shapes",
        "resnet50.layer3",
        "--mode",
        "eval_fwd",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--rounds",
        "1",
        "--out",
        str(tmp_path),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    kernels = bn_ext.build_info()["cpu_kernels"]
    assert sorted(p.name for p in tmp_path.glob("bench-*.json")) == [f"bench-cpu-{kernels}-partial.json"]


def test_isa_times_each_cpu_build_against_the_same_torch_calls(tmp_path):
    """--isa default,native: one row per build for each job, each with its own parity check, the
    same torch time (the builds take turns with one torch call sequence), one results file that
    names both builds, and the build back to the one in use afterwards."""
    env = repo_env()
    env.pop("BN_EXT_CPU_ISA", None)
    cmd = [sys.executable, "-m", "bn_ext.bench", "--device", "cpu", "--shapes", "resnet50.layer3"]
    cmd += ["--mode", "train_fwd,eval_fwd", "--dtype", "float32", "--repeats", "2", "--warmup", "0", "--rounds", "1"]
    cmd += ["--out", str(tmp_path)]
    run = subprocess.run(cmd + ["--isa", "default,native"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    before = bn_ext._C._use_cpu_kernels("native")  # what native is on this CPU
    native = bn_ext.build_info()["cpu_kernels"]
    bn_ext._C._use_cpu_kernels(before)
    builds = ["default"] + ([native] if native != "default" else [])
    files = list(tmp_path.glob("bench-*.json"))
    assert [p.name for p in files] == [f"bench-cpu-{'-'.join(builds)}-partial.json"]
    data = json.loads(files[0].read_text())
    rows = data["results"]
    assert data["machine"]["bn_ext_cpu_kernels_timed"] == builds
    assert "avx2" in data["machine"]["cpu_flags"]["has"] or native == "default"
    assert len(rows) == 2 * 2 * len(builds)  # 2 layouts x 2 modes (float32) x builds
    for job in {(r["layout"], r["mode"]) for r in rows}:
        same_job = [r for r in rows if (r["layout"], r["mode"]) == job]
        assert [r["cpu_kernels"] for r in same_job] == builds
        assert len({r["torch_ms"] for r in same_job}) == 1
        assert all(r["parity"] == "ok" for r in same_job)
    for build in builds:
        assert f"train_fwd     float32  {build:>10} vs native-cpu" in run.stdout
    bad = subprocess.run(cmd + ["--isa", "sse9"], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "--isa: cpu kernels: expected" in bad.stderr
    fused = subprocess.run(cmd + ["--isa", "default", "--suite", "fused"], capture_output=True, text=True, env=env)
    assert fused.returncode == 2 and "the fused suite times the build in use only" in fused.stderr


def test_two_reads_reference_is_timed_for_the_bandwidth_target_cases_only():
    big = Case("resnet50.bn1", (4, 64, 112, 112), "contiguous")  # 12.8 MB in float32, 6.4 MB in bfloat16
    assert two_reads_case(big, "float32", "train_fwd", "cpu")
    assert not two_reads_case(big, "bfloat16", "train_fwd", "cpu")
    assert not two_reads_case(big, "float32", "eval_fwd", "cpu")
    assert not two_reads_case(big, "float32", "train_fwd_bwd", "cpu")
    assert not two_reads_case(big, "float32", "train_fwd", "cuda")
    # the reference's two calls: a read of x, and our elementwise pass with the module's parameters
    module = bn_ext.BatchNorm2d(3)
    x = torch.randn(2, 3, 5, 5)
    read, elementwise = two_reads_fns(module, x)
    assert torch.allclose(read(), x.sum())
    module.eval()
    torch.testing.assert_close(elementwise(), module(x))


def test_bench_cli_reports_the_two_reads_reference(tmp_path):
    env = repo_env()
    cmd = [
        sys.executable,
        "-m",
        "bn_ext.bench",
        "--device",
        "cpu",
        "--shapes",
        "bn1d.4096x1024",
        "--dtype",
        "bfloat16",
        "--mode",
        "train_fwd",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--out",
        str(tmp_path),
        "--tag",
        "t",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "two reads" in run.stdout
    with open(tmp_path / "bench-t.json") as f:
        (row,) = json.load(f)["results"]
    assert row["tensor_MB"] >= 8 and row["two_reads_ms"] > 0
    copy_s = 2 * row["tensor_MB"] * 1e6 / (row["copy_GBps"] * 1e9)  # the copy's time, from its bandwidth
    assert row["two_reads_fraction_of_copy"] == pytest.approx(copy_s / (row["two_reads_ms"] / 1e3))


def test_fused_suite_writes_its_results(tmp_path):
    cmd = [sys.executable, "-m", "bn_ext.bench", "--suite", "fused", "--shapes", "resnet50.layer3"]
    cmd += ["--dtype", "float32", "--mode", "eval_fwd,train_fwd_bwd", "--repeats", "1", "--warmup", "0"]
    cmd += ["--rounds", "1", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=repo_env(), timeout=600)
    assert run.returncode == 0, run.stderr
    kernels = bn_ext.build_info()["cpu_kernels"]
    with open(tmp_path / f"bench-cpu-{kernels}-fused-partial.json") as f:
        rows = json.load(f)["results"]
    # two layouts x two modes of the one case, each against both references
    assert len(rows) == 4 and {r["pattern"] for r in rows} == {"bn+add+relu"}
    for r in rows:
        assert r["parity"] == "ok"
        assert r["speedup"] == pytest.approx(r["torch_ms"] / r["fused_ms"])
        assert r["speedup_vs_unfused"] == pytest.approx(r["unfused_ms"] / r["fused_ms"])
    table = (tmp_path / f"bench-cpu-{kernels}-fused-partial.txt").read_text()
    assert "geomean train_fwd_bwd float32" in table
    # --render redoes the .txt from the JSON alone
    (tmp_path / f"bench-cpu-{kernels}-fused-partial.txt").unlink()
    render = [
        sys.executable,
        "-m",
        "bn_ext.bench",
        "--render",
        str(tmp_path / f"bench-cpu-{kernels}-fused-partial.json"),
    ]
    assert subprocess.run(render, capture_output=True, text=True, env=repo_env(), timeout=600).returncode == 0
    assert (tmp_path / f"bench-cpu-{kernels}-fused-partial.txt").read_text() == table


def test_model_bench_runs_each_variant(capsys):
    pytest.importorskip("torchvision")
    from bn_ext.bench import model

    model.main(["--model", "resnet18", "--batch", "2", "--size", "32", "--steps", "1"])
    model.main(["--model", "resnet18", "--batch", "2", "--size", "32", "--steps", "1", "--eval", "--profile"])
    out = capsys.readouterr().out.splitlines()
    headers, lines = [line for line in out if "threads, malloc" in line], [line for line in out if "ms/step" in line]
    assert len(headers) == 2 and len(lines) == 6, out
    assert [line.split()[4] for line in lines] == ["torch.nn", "bn_ext", "bn_ext.fuse"] * 2
    assert all("eager train" in line for line in lines[:3]) and all("eager eval" in line for line in lines[3:])
    profiled = [line.split("BN+act ")[1].split() for line in lines[3:]]
    # ms of BatchNorm + activation, their share of the step's CPU time, ms of adds
    assert all(float(p[0]) >= 0 and 0 < float(p[2].rstrip("%")) < 100 and float(p[-2]) >= 0 for p in profiled), lines


def test_model_bench_runs_every_batchnorm_of_the_bn_ext_variants_on_bn_ext():
    # resnet18's downsample BatchNorms have no activation after them: fuse alone leaves them
    torchvision = pytest.importorskip("torchvision")
    from bn_ext.bench import model

    nets = model.variants(torchvision.models.resnet18(num_classes=10))
    kinds = {
        name: {type(m) for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
        for name, net in nets.items()
    }
    assert kinds["torch.nn"] == {torch.nn.BatchNorm2d}
    assert kinds["bn_ext"] == {bn_ext.BatchNorm2d}
    assert kinds["bn_ext.fuse"] == {bn_ext.BatchNorm2d, bn_ext.BatchNormAct2d}
    assert nets["bn_ext.fuse"].bn_ext_fused == 17


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_bench_allocator_setting_applies_and_the_model_bench_names_it(capsys):
    # Whether a freed block's pages fault back in depends on the whole heap's layout (in separate
    # processes 40 copies of a 12 MB tensor faulted 0 to 15,000 pages either way), so what is
    # tested is that glibc takes the setting and that the results say which one held.
    pytest.importorskip("torchvision")
    from bn_ext.bench import model
    from bn_ext.bench.allocator import MALLOC_SETTING, keep_freed_memory

    assert keep_freed_memory() == MALLOC_SETTING
    model.main(["--model", "resnet18", "--batch", "2", "--size", "32", "--steps", "1", "--eval"])
    assert f"malloc {MALLOC_SETTING}" in capsys.readouterr().out


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_op_timer_saves_each_op_and_compares_pairs(tmp_path, monkeypatch, capsys, fused):
    from bn_ext.bench import ops as op_timer

    monkeypatch.setattr(op_timer, "CASES", [("small", (2, 8, 4, 4), None)])
    paths = [str(tmp_path / f"{k}.json") for k in range(2)]
    for path in paths:
        assert op_timer.main(["save", path, "--repeats", "2"] + (["--fused"] if fused else [])) == 0
    with open(paths[0]) as f:
        saved = json.load(f)
    ops = ("act_train add+relu", "act_train silu", "act_backward add+relu", "act_backward silu")
    ops = ops if fused else ("train", "elemt", "backward")
    assert sorted(saved) == sorted(f"small contiguous {dt} {op}" for dt in ("float32", "bfloat16") for op in ops)
    assert all(v > 0 for v in saved.values())
    assert op_timer.main(["compare", *paths]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(saved)
