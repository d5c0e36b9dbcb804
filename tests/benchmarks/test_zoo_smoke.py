"""The zoo benchmark, run for real on a small sample: the sampler, the label checks, the scoring
and the report, so the suite notices when any of them breaks (the full runs live in
``benchmarks/zoo``)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `benchmarks`

from benchmarks.zoo import data  # noqa: E402
from benchmarks.zoo.__main__ import main, parse_seeds  # noqa: E402
from benchmarks.zoo.evaluate import ZooOutcome, evaluate  # noqa: E402
from benchmarks.zoo.pathologies import PATHOLOGIES  # noqa: E402
from benchmarks.zoo.report import failures_markdown, summary_markdown  # noqa: E402
from benchmarks.zoo.sampler import BATCH_SIZES, BLOCK, pathology_of, sample, seeds_covering  # noqa: E402
from benchmarks.zoo.scoring import clopper_pearson_upper, percentile, summarise  # noqa: E402
from benchmarks.zoo.spec import FAMILIES, OPTIMIZERS, SCHEDULES, RunSpec  # noqa: E402
from benchmarks.zoo.torch_runner import TorchRunner  # noqa: E402
from benchmarks.zoo.workers import run_zoo  # noqa: E402

torch.set_num_threads(1)

SAMPLE = seeds_covering(range(100))
SAMPLE = (SAMPLE + [s for s in range(100) if s not in SAMPLE])[:20]


def test_the_sampler_is_deterministic_and_json_round_trips():
    for seed in (0, 17, 1234, -3):
        a, b = sample(seed), sample(seed)
        assert a == b and a.seed == seed
        d = json.loads(a.to_json())
        assert RunSpec.from_dict(d) == a
        assert "\n" not in str(a) and str(a).startswith(f"#{seed} ")
    assert sample(1) != sample(2)


def test_the_sampler_covers_every_family_pathology_optimizer_and_schedule():
    specs = [sample(s) for s in range(300)]
    healthy = [s for s in specs if s.pathology is None]
    assert {s.family for s in healthy} == set(FAMILIES)
    assert {s.pathology.name for s in specs if s.pathology} == set(PATHOLOGIES)
    assert {s.optimizer for s in specs} == set(OPTIMIZERS)
    assert {s.schedule for s in specs} == set(SCHEDULES)
    assert {s.batch_size for s in specs} == set(BATCH_SIZES)
    assert {s.dataset for s in specs} >= set(data.SKLEARN_LOADERS) | set(data.GENERATED)
    assert any(s.bf16 for s in specs) and any(s.frozen for s in specs)
    assert any(s.dropout for s in specs) and any(s.label_smoothing for s in specs)
    assert any(s.weight_decay for s in specs) and any(s.momentum for s in specs)
    ragged = [s for s in healthy
              if data.train_rows(s.dataset, s.dataset_options) % s.batch_size
              and s.steps * s.batch_size > data.train_rows(s.dataset, s.dataset_options)]
    assert len(ragged) > len(healthy) / 2  # most healthy runs meet a short last batch
    for s in specs:
        if s.pathology is not None:
            assert s.family in PATHOLOGIES[s.pathology.name].families
            assert 0 <= s.pathology.onset < s.steps
            assert s.pathology.onset == 0 or PATHOLOGIES[s.pathology.name].from_start is False


def test_every_block_of_seeds_holds_each_pathology():
    for block in (0, 33, 52):
        names = [pathology_of(s) for s in range(block * BLOCK, (block + 1) * BLOCK)]
        assert set(PATHOLOGIES) <= set(names)
        assert names.count(None) == BLOCK - len(PATHOLOGIES)
    report = [sample(s) for s in range(1000, 1600)]
    assert sum(s.pathology is None for s in report) >= 350  # 359: the range is not aligned to blocks
    assert sum(s.pathology is not None for s in report) >= 235


def test_the_twin_is_the_same_run_without_its_pathology():
    spec = next(sample(s) for s in range(200) if sample(s).pathology and sample(s).pathology.name == "lr_jump")
    twin = spec.twin()
    assert twin.pathology is None and twin.label == "healthy"
    assert dataclasses.replace(twin, pathology=spec.pathology) == spec


def test_clopper_pearson_upper_bound_matches_known_values():
    # Reference values: scipy.stats.beta.ppf(0.95, k + 1, n - k).
    assert math.isclose(clopper_pearson_upper(0, 300), 1 - 0.05 ** (1 / 300), rel_tol=1e-12)
    assert math.isclose(clopper_pearson_upper(0, 300), 0.009936081944457708, rel_tol=1e-9)
    assert math.isclose(clopper_pearson_upper(1, 10), 0.39416330243650466, rel_tol=1e-9)
    assert math.isclose(clopper_pearson_upper(5, 100), 0.1022533776432745, rel_tol=1e-9)
    assert math.isclose(clopper_pearson_upper(3, 300), 0.025641393082609616, rel_tol=1e-9)
    assert clopper_pearson_upper(7, 7) == 1.0
    assert math.isnan(clopper_pearson_upper(0, 0))
    with pytest.raises(ValueError, match="k must be within"):
        clopper_pearson_upper(4, 3)
    assert percentile([5, 1, 3, 2, 4], 90) == 5 and percentile([], 50) is None


def _spec(**changes) -> RunSpec:
    base = RunSpec(seed=5, family="mlp", dataset="iris", depth=1, width=16, optimizer="adam", lr=0.01,
                   schedule="constant", batch_size=16, steps=80)
    return dataclasses.replace(base, **changes)


def test_a_healthy_spec_that_learns_is_kept_and_observe_changes_nothing():
    outcome = evaluate(_spec(), TorchRunner())
    assert outcome.status == "kept", outcome.check
    assert outcome.observe_identical is True
    assert outcome.unwatched["test_accuracy"] > 0.7


def test_the_label_checks_drop_a_healthy_spec_that_diverges():
    outcome = evaluate(_spec(optimizer="sgd", lr=60.0), TorchRunner())
    assert outcome.status == "dropped"
    assert "NON-FINITE" in outcome.reason or "does not learn" in outcome.reason
    assert outcome.observe_identical is None  # a dropped run is not watched


def test_the_label_checks_drop_a_pathology_that_did_not_happen():
    from benchmarks.zoo.spec import Pathology

    runner = TorchRunner()
    harmless = evaluate(_spec(pathology=Pathology("lr_high", 0, 1.0)), runner)  # "x1": the sane LR
    assert harmless.status == "dropped", harmless.check
    real = evaluate(_spec(optimizer="sgd", lr=0.1, pathology=Pathology("lr_high", 0, 300.0)), runner)
    assert real.status == "kept", real.check
    nan = evaluate(_spec(pathology=Pathology("nan_input", 30)), runner)
    assert nan.status == "kept" and nan.probe_nonfinite_step == 30, nan.check


def test_a_20_run_sample_runs_end_to_end_and_is_scored(tmp_path):
    start = time.perf_counter()
    outcomes = run_zoo(SAMPLE, "torch", workers=1, max_steps=50, progress=False)
    seconds = time.perf_counter() - start
    assert len(outcomes) == 20 and seconds < 120  # ~25 s on one shared core; a 5x slowdown fails
    assert [o.seed for o in outcomes] == sorted(SAMPLE)
    assert not [o.reason for o in outcomes if o.status == "error"]
    kept = [o for o in outcomes if o.kept]
    assert sum(o.healthy for o in kept) >= 4 and sum(not o.healthy for o in kept) >= 6
    for o in kept:
        assert o.observe_identical is True, o.line  # observe never changes training
        assert o.auto["identical"] in (True, False)
        if not o.healthy:
            assert o.detected == (o.latency is not None)
        assert all(f["severity"] in ("warning", "error") for f in o.false_alarms)
    totals = summarise(outcomes, seconds=seconds)
    assert totals["seeds"] == 20
    assert totals["healthy"] + totals["pathological"] + totals["dropped"] + totals["errors"] == 20
    assert totals["observe_identical"]["equal"] == totals["kept"]
    assert totals["detection"]["all"]["runs"] == totals["pathological"]
    assert 0 <= totals["false_alarms"]["upper95"] <= 1
    text = summary_markdown(totals) + failures_markdown(outcomes)
    assert "healthy runs with a false alarm" in text and "### Dropped" in text
    again = ZooOutcome.from_dict(json.loads(json.dumps(outcomes[0].to_dict())))
    assert again == outcomes[0]

    # The docs section: only report seeds are published, with every failure on a page of its own.
    from benchmarks.docs_page import zoo_section
    from benchmarks.zoo.docs import main as write_docs

    results, docs = tmp_path / "bench", tmp_path / "docs"
    results.mkdir()
    docs.mkdir()
    page = docs / "benchmarks.md"
    page.write_text("# Benchmarks\n\n## Overhead\n\nkept\n\n## Doctor\n\nkept too\n")
    (results / "zoo-torch.json").write_text(json.dumps({"seeds": "0-19", "totals": totals}))
    assert zoo_section(results, None) == ""  # tuning seeds are never published
    (results / "zoo-torch.json").write_text(json.dumps({"seeds": "2000-2019", "totals": totals}))
    (results / "zoo-torch.md").write_text(failures_markdown(outcomes))
    note = tmp_path / "note.md"
    note.write_text("How these seeds were chosen.")
    assert write_docs([str(results), str(page), "--note", str(note)]) == 0
    text = page.read_text()
    assert text.index("## Overhead") < text.index("## Zoo") < text.index("## Doctor")
    assert "kept\n" in text and "kept too" in text and "How these seeds were chosen." in text
    assert "### Seeds 2000-2019: torch" in text and "(zoo-torch.md)" in text
    assert "### Dropped" in (docs / "zoo-torch.md").read_text()
    assert write_docs([str(results), str(page)]) == 0 and page.read_text().count("## Zoo") == 1


def test_scoring_counts_alarms_on_healthy_runs_and_before_the_onset_apart():
    def outcome(seed, pathology=None, alarms=(), detected=False, latency=None, rescued=None, needs=None):
        return ZooOutcome(seed=seed, framework="torch", spec={}, line=f"#{seed}", family="mlp",
                          pathology=pathology, label="healthy" if pathology is None else PATHOLOGIES[pathology].expected,
                          onset=None if pathology is None else 10, detected=detected, latency=latency,
                          false_alarms=[{"kind": k, "severity": "warning", "step": 3, "message": "",
                                         "context": {"tags": ["tiny batch"], "note": ""}} for k in alarms],
                          observe_identical=True, auto={"actions": {}, "identical": True},
                          changed=False if pathology is None else None, rescued=rescued, needs_rescue=needs)

    outs = [outcome(1), outcome(2, alarms=["exploding", "loss_spike"]), outcome(3),
            outcome(4, "nan_input", alarms=["exploding"], detected=True, latency=0, rescued=True, needs=True),
            outcome(5, "lr_jump", detected=True, latency=4, rescued=False, needs=True),
            outcome(6, "saturating"),
            dataclasses.replace(outcome(7), status="dropped", reason="does not learn")]
    s = summarise(outs)
    assert (s["healthy"], s["pathological"], s["dropped"]) == (3, 3, 1)
    assert s["false_alarms"]["runs"] == 1 and s["false_alarms"]["by_kind"] == {"exploding": 1, "loss_spike": 1}
    assert s["pre_onset_alarms"]["runs"] == 1
    assert math.isclose(s["false_alarms"]["upper95"], clopper_pearson_upper(1, 3))
    assert s["detection"]["all"]["detected"] == 2 and s["detection"]["by_kind"]["vanishing"]["detected"] == 0
    assert s["detection"]["by_kind"]["exploding"]["median_latency"] == 4
    assert (s["rescue"]["runs"], s["rescue"]["rescued"]) == (2, 1)


def test_the_cli_parses_seed_ranges_and_rejects_unknown_filters(capsys):
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    with pytest.raises(ValueError):
        parse_seeds("5-2")
    with pytest.raises(SystemExit) as exc:
        main(["--only", "nonsense"])
    assert exc.value.code == 2
    assert "--only takes" in capsys.readouterr().err
