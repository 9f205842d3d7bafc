import json
from dataclasses import asdict, replace

import h5py
import numpy as np
import pytest

from paper_kd import bench, cli
from paper_kd.models import build_model


def test_synthetic_jets_have_realistic_multiplicity_and_format():
    inputs, labels = bench.synthetic_jets(np.random.default_rng(0), 2000, 57, n_max=200)
    p4, mask = inputs["p4"], inputs["mask"]
    assert p4.shape == (2000, 200, 4) and p4.dtype == np.float32 and mask.dtype == bool
    assert mask.sum(axis=1).mean() == pytest.approx(57, abs=1.5)
    np.testing.assert_array_equal(p4[~mask], 0.0)
    # Massless, pT-sorted, about 600 GeV of jet pT.
    momentum = np.linalg.norm(p4[..., 1:].astype(np.float64), axis=-1)
    np.testing.assert_allclose(p4[..., 0], momentum, rtol=1e-5)
    pt = np.hypot(p4[..., 1], p4[..., 2])
    assert np.all(np.diff(pt, axis=1) <= 1e-3)
    np.testing.assert_allclose(pt.sum(axis=1), 600.0, rtol=1e-4)
    assert set(np.unique(labels)) == {0, 1}


def test_matmul_section_report_and_files(tmp_path):
    settings = bench.BenchSettings.tiny()
    report = bench.run_bench(settings, sections=("matmul",))
    matmul = report["sections"]["matmul"]
    assert set(report["sections"]) == {"matmul"}
    assert matmul["peak_gflops"] == max(matmul["gflops_by_size"].values()) > 0
    assert report["machine"]["cpu_count"] >= 1 and report["jets"]["n_jets"] > 0
    assert set(report["targets"]) == set(bench.TARGETS)
    # A tiny run makes no claim about the targets.
    assert all(target["met"] is None for target in report["targets"].values())

    json_path, md_path = bench.write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text()) == report
    markdown = md_path.read_text()
    assert "## matmul" in markdown and "## Targets" in markdown and "Peak:" in markdown
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["bench.json", "bench.md"]


def test_a_failing_section_is_reported_and_does_not_stop_the_run():
    settings = replace(bench.BenchSettings.tiny(), generation_processes=("gluon",))
    report = bench.run_bench(settings, sections=("generation", "matmul"))
    generation = report["sections"]["generation"]
    assert "gluon" in generation["unavailable"]
    assert report["sections"]["matmul"]["peak_gflops"] > 0
    assert "unavailable: " in bench.markdown_report(report)


def test_targets_are_checked_in_both_directions():
    sections = {
        "lorentznet": {
            "paper": {
                "graph": {"train_jets_per_s": 40.0, "train_fraction_of_peak": 0.1},
                "xla": {"train_jets_per_s": 70.0, "train_fraction_of_peak": 0.4},
            }
        },
        "students": {"deepset": {"latency_batch1_ms": 1.5, "inference_jets_per_s": 2e4}},
        "distill": {"cached_over_plain": 1.1},
    }
    targets = bench.check_targets(sections)
    assert targets["lorentznet_paper_train_jets_per_s"]["value"] == 70.0  # best mode counts
    assert targets["lorentznet_paper_train_jets_per_s"]["met"] is True
    assert targets["deepset_latency_batch1_ms"]["met"] is False
    assert targets["deepset_jets_per_s_batch1024"]["met"] is True
    assert targets["distill_cached_over_plain"]["met"] is True
    assert targets["generation_fraction_of_raw"] == {
        "target": 0.8, "value": None, "met": None, "kind": "min"
    }  # fmt: skip


def test_bench_command_bad_input_is_one_line(tmp_path, capsys):
    assert cli.main(["bench", "--tiny", "--data", str(tmp_path / "none.h5")]) == 1
    assert "none.h5: no such jet file" in capsys.readouterr().err

    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as handle:
        handle["p4"] = np.zeros((2, 3, 4))
    argv = ["bench", "--tiny", "--only", "matmul", "--data", str(wrong), "-o", str(tmp_path)]
    assert cli.main(argv) == 1
    assert "'format'" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        cli.main(["bench", "--only", "matmul,nonsense"])


@pytest.mark.slow
def test_tiny_bench_runs_every_section(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", "--tiny", "-o", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    sections = report["sections"]
    assert set(sections) == set(bench.SECTIONS)
    for name, result in sections.items():
        assert "unavailable" not in result, (name, result)

    paper = sections["lorentznet"]["paper"]["graph"]
    assert paper["train_jets_per_s"] > 0 and paper["inference_jets_per_s"] > 0
    assert paper["train_jets_per_s_bucketed"] > 0
    assert 0 < sections["lorentznet"]["edge_efficiency"] <= 1
    profile = sections["lorentznet"]["paper"]["graph"]["op_profile"]
    assert profile["op_ms_per_step"] > 0
    assert any("MatMul" in op["op"] for op in profile["ops"]), profile["ops"]
    assert 0.99 >= sum(op["share"] for op in profile["ops"]) > 0.5
    assert 0 < profile["product_share"] < 1 and profile["product_gflops_per_s"] > 0
    for student in bench.STUDENTS:
        result = sections["students"][student]
        assert result["train_jets_per_s"] > 0 and result["latency_batch1_ms"] > 0
        assert result["parameters"] > 0
    assert sections["distill"]["cached_over_plain"] > 0
    generation = sections["generation"]["qcd"]
    assert generation["raw_events_per_cpu_s"] > 0
    # Same seed, same events: the pipeline cannot outrun Pythia alone.
    assert 0 < generation["fraction_of_raw"] < 1.05
    assert sections["generation"]["qcd"]["jets_per_s_2_processes"] >= 0
    assert sections["pipeline"]["memory_jets_per_s"] > 0
    assert sections["pipeline"]["file_streamed_jets_per_s"] > 0
    assert "## students" in (out / "bench.md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_edge_efficiency_counts_beams_and_padding():
    # Jets of 3 and 1 constituents padded to width 3; two beams each: 5 and 3 nodes
    # in a 5-wide graph. Real edges 5*4 + 3*2 = 26 of 2*5*4 = 40 computed.
    mask = np.array([[1, 1, 1], [1, 0, 0]], bool)
    batch = ({"p4": np.zeros((2, 3, 4), np.float32), "mask": mask}, np.array([1, 0]))
    assert bench._edge_efficiency([batch]) == pytest.approx(26 / 40)


def test_bucketed_batches_pad_less_than_random_ones():
    rng = np.random.default_rng(3)
    inputs, labels = bench.synthetic_jets(rng, 2048)
    random = bench._batches(inputs, labels, 32, 16, np.random.default_rng(4))
    bucketed = bench._bucketed_batches(inputs, labels, 32, 16, np.random.default_rng(4))
    assert len(bucketed) == 16
    for batch, label in bucketed:
        assert batch["mask"].shape[1] == batch["mask"].sum(axis=1).max()
        assert abs(label.mean() - labels.mean()) < 0.1  # class balance kept
    assert bench._edge_efficiency(bucketed) > bench._edge_efficiency(random) + 0.1


def traced_tiny_teacher_step(seed, batch_size, jit):
    """A small LorentzNet's training step, already traced (or compiled) on two batches."""
    rng = np.random.default_rng(seed)
    inputs, labels = bench.synthetic_jets(rng, 2 * batch_size, mean_constituents=10, n_max=20)
    batches = bench._batches(inputs, labels, batch_size, 2, rng)
    model = build_model("lorentznet", n_hidden=8, n_layers=2)
    model(batches[0][0])
    step = bench._train_step(model, 1e-3, jit)
    for batch in batches:
        step(*batch)
    return model, batches, step


def test_op_profile_reads_the_compiled_step_and_the_products_rate():
    # XLA runs a compiled program: the profile must read its thunks (dot.N,
    # fusions), not the graph executor's op events, and find the products in them.
    model, batches, step = traced_tiny_teacher_step(4, 8, jit=True)
    flops = bench._padded_train_flops(model, batches)
    profile = bench._op_profile(step, batches, 0.01, flops)
    assert "ops" in profile, profile
    names = [op["op"] for op in profile["ops"]]
    assert not any(name[-1].isdigit() and "." in name for name in names), names
    assert 0 < profile["product_share"] < 1, names
    assert profile["product_gflops_per_s"] > 0
    # Each batch costs 3 passes of its 8 jets at the batch's padded width.
    per_jet = [bench._model_size(model, b["mask"].shape[1])["flops_per_jet"] for b, _ in batches]
    assert flops == pytest.approx(3 * 8 * np.mean(per_jet))
    assert min(per_jet) < bench._model_size(model, 20)["flops_per_jet"]


def test_graph_op_profile_leaves_out_the_executor_events():
    _, batches, step = traced_tiny_teacher_step(5, 4, jit=False)
    profile = bench._op_profile(step, batches, 0.01)
    names = [op["op"] for op in profile["ops"]]
    # ExecutorState::Process spans every op it runs: counted, it would double the total.
    assert "Process" not in names and any("MatMul" in name for name in names), names


def test_report_says_which_settings_and_sections_made_it():
    quick = bench._settings_line(bench._jsonable(asdict(bench.BenchSettings.quick())), ["students"])
    assert "`paper-kd bench --quick --only students`" in quick
    assert "graph mode" in quick and "XLA" not in quick.split(";")[1]
    full = bench._settings_line(bench._jsonable(asdict(bench.BenchSettings.full())), bench.SECTIONS)
    assert "`paper-kd bench`" in full and "graph and XLA mode" in full
