"""Pure logic of benchmarks/: the workload's JSON layouts, the steering processor for transformers,
the sweep's argument checks and statistics, the profile summary. No server needed."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import throughput
from benchmarks.gpu.pyspy_summary import stage_of
from benchmarks.steer import STEER_BIAS, HFSteer
from benchmarks.workload import CORPUS, GOLD, STYLES, card_pretty_json, load
from client.models import endpoint_json_schema

# The model card's first example output, verbatim (what the seed's model writes).
CARD_EXAMPLE = """{
  "endpoints": [
    {
      "endpoint_name_standardized": "Number of participants achieving CR and PR",
      "measurement_of": "Objective Response Rate",
      "measurement_type": "binary",
      "metric_type": "count",
      "timeframe": "Through 4 months after starting treatment",
      "measurement_method": null,
      "evaluation_criteria": "IWG 2023 criteria",
      "unit": "number",
      "population": null,
      "is_composite": true,
      "components": ["CR", "PR"]
    }
  ]
}"""


def test_workload_files_load_with_valid_gold_answers() -> None:
    assert len(load(CORPUS)) >= 200
    gold = load(GOLD)
    assert gold and all(item.expected is not None for item in gold)


def test_card_pretty_layout_matches_the_model_card() -> None:
    first = load(GOLD)[0]
    assert first.expected is not None
    assert card_pretty_json(first.expected) == CARD_EXAMPLE


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_layout_has_identical_parsed_content(style: str) -> None:
    for item in load(GOLD):
        assert item.expected is not None
        assert json.loads(STYLES[style](item.expected)) == item.expected.model_dump(mode="json")


def test_layouts_are_what_each_grammar_configuration_accepts() -> None:
    """vLLM 0.23's xgrammar backend compiles with any_whitespace=False only, which xgrammar spaces
    as ', ' and ': '; newer vLLM also passes separators (',', ':'), giving minimal JSON."""
    xgr = pytest.importorskip("xgrammar")
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo([chr(i) for i in range(32, 127)]))
    schema = json.dumps(endpoint_json_schema())
    grammars = {
        "spaced": compiler.compile_json_schema(schema, any_whitespace=False),
        "minimal": compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":")),
        "pretty": compiler.compile_json_schema(schema, any_whitespace=True),
    }
    for item in load(GOLD)[:10]:
        assert item.expected is not None
        for grammar_name, grammar in grammars.items():
            for style in ("spaced", "minimal", "pretty"):
                matcher = xgr.GrammarMatcher(grammar, terminate_without_stop_token=True)
                accepted = matcher.accept_string(STYLES[style](item.expected)) and matcher.is_terminated()
                expected = style == grammar_name or (grammar_name == "pretty")
                assert accepted == expected, (grammar_name, style)


def test_hf_steer_forces_the_target_then_eos() -> None:
    steer = HFSteer([5, 7], prompt_len=3, eos=1)
    for step, want in enumerate([5, 7, 1, 1]):
        scores = torch.zeros(1, 10)
        out = steer(torch.zeros(1, 3 + step, dtype=torch.long), scores)
        assert int(out.argmax()) == want and float(out.max()) == STEER_BIAS


def test_throughput_rejects_bad_arguments() -> None:
    for bad in (["--concurrency", "0,8"], ["--concurrency", "a"], ["--modes", "fast"], ["--duration", "-1"]):
        with pytest.raises(SystemExit):
            throughput.parse_args(bad)
    args = throughput.parse_args(["--modes", "free,guided", "--label", "backend=guidance"])
    assert args.modes == ["guided", "free"] and dict(args.label) == {"backend": "guidance"}


def test_percentile_and_request_bodies() -> None:
    assert throughput.percentile([], 0.5) is None
    assert throughput.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert throughput.percentile([float(i) for i in range(101)], 0.99) == 99.0
    args = throughput.parse_args(["--steer", "minimal", "--stream"])
    item = load(GOLD)[0]
    guided = throughput.request_body(args, item, guided=True, max_tokens=64)
    free = throughput.request_body(args, item, guided=False, max_tokens=64)
    assert guided["response_format"]["type"] == "json_schema" and "ignore_eos" not in guided
    assert free["response_format"] == {"type": "text"} and free["ignore_eos"] is True
    assert json.loads(guided["vllm_xargs"]["steer_text"]) == item.expected.model_dump(mode="json")  # type: ignore[union-attr]
    assert guided["stream"] and guided["stream_options"] == {"include_usage": True}


def test_pyspy_stage_of_prefers_specific_stages() -> None:
    fill = [
        "EngineCore.step_with_batch_queue",
        "Scheduler.get_grammar_bitmask (x.py:1)",
        "Condition.wait (t.py:2)",
    ]
    assert stage_of(fill) == "grammar: fill bitmasks (scheduler)"
    apply = ["GPUModelRunner.sample_tokens (r.py:1)", "apply_grammar_bitmask (u.py:9)"]
    assert stage_of(apply) == "grammar: apply bitmask (runner)"
    assert stage_of(["foo (a.py:1)", "bar (b.py:2)"]) == "other: bar"


def test_soak_judges_memory_growth_over_the_measured_part() -> None:
    from benchmarks.soak import MIB, memory, parse_duration

    steady = [(t * 2.0, 3000 * MIB + (t % 3) * MIB) for t in range(300)]
    leaking = [(t * 2.0, 3000 * MIB + t * MIB) for t in range(300)]  # 30 MiB a minute
    assert memory(steady, 64).flat and abs(memory(steady, 64).growth_mib) <= 2
    leak = memory(leaking, 64)
    assert not leak.flat and leak.growth_mib > 200 and len(leak.by_minute_mib) == 10
    assert leak.by_minute_mib == sorted(leak.by_minute_mib)
    assert [parse_duration(x) for x in ("90", "90s", "10m", "1h")] == [90, 90, 600, 3600]
    with pytest.raises(Exception, match="expected a duration"):
        parse_duration("ten minutes")


def test_soak_errors_are_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import socket

    from benchmarks.soak import after_warmup, main

    with pytest.raises(SystemExit, match="no memory sample after the warm-up"):
        after_warmup([(1.0, 5.0), (70.0, 0.0)], warmup=60, duration=60)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening
        with pytest.raises(SystemExit, match=f"nothing of this user listens on port {port}"):
            main(["--host", f"http://127.0.0.1:{port}"])
    # locust refuses an option it does not know and writes no statistics
    argv = ["--host", "http://127.0.0.1:9", "--server-pid", str(os.getpid()), "--warmup", "0s"]
    argv += ["--duration", "1s", "--interval", "0.2", "--csv-prefix", str(tmp_path / "s"), "--no-such-flag"]
    with pytest.raises(SystemExit, match="soak: error: locust wrote no statistics"):
        main(argv)
