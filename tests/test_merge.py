"""merge_adapter.py against PEFT: per tensor, per logit, and every refusal leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge_adapter
from serve.demo_model import DemoPaths
from tests.peft_oracle import load_base, peft_model


def _run(*args: str) -> int:
    return merge_adapter.main(list(args))


@pytest.fixture(scope="module")
def merged_full(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("m") / "full"
    assert (
        _run(
            "--base", str(demo.base), "--adapter", str(demo.adapter), "--output", str(out), "--dtype", "fp32"
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def merged_text(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("m") / "text"
    args = ["--base", str(demo.base), "--adapter", str(demo.adapter), "--output", str(out)]
    assert _run(*args, "--dtype", "fp32", "--text-only") == 0
    return out


def test_full_merge_equals_peft_merge_and_unload_per_tensor(demo: DemoPaths, merged_full: Path) -> None:
    reference = peft_model(demo.base, demo.adapter).merge_and_unload().state_dict()
    ours = load_file(merged_full / "model.safetensors")
    assert "lm_head.weight" not in ours
    reference.pop("lm_head.weight")  # tied to the embeddings, as in the base
    base = load_file(demo.base / "model.safetensors")
    # The checkpoint's tensors transformers builds no module for (the KV-shared layers' k/v) are
    # not in PEFT's model; the merge carries them over as they are.
    assert set(reference) <= set(ours) == set(base)
    for key in set(ours) - set(reference):
        assert torch.equal(ours[key], base[key].float()), key
    changed = 0
    for key, ref in reference.items():
        torch.testing.assert_close(ours[key], ref, rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(ours[key], base[key].float())
    report = json.loads((merged_full / "merge_report.json").read_text())
    assert changed == len(report["merged"]) + len(report["merged_tower"]) > 0


def test_tower_lora_lands_on_real_linear_weight_and_keeps_clip_buffers(
    demo: DemoPaths, merged_full: Path
) -> None:
    report = json.loads((merged_full / "merge_report.json").read_text())
    assert report["merged_tower"] and all(k.endswith(".linear.weight") for k in report["merged_tower"])
    with safe_open(merged_full / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert float(f.get_tensor("model.vision_tower.encoder.layers.0.self_attn.q_proj.input_max")) == 8.0
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    assert "quantization_config" not in json.loads((merged_full / "config.json").read_text())
    # what vLLM's Gemma4Processor reads to serve this layout comes along unchanged
    assert (merged_full / "processor_config.json").read_bytes() == (
        demo.base / "processor_config.json"
    ).read_bytes()


def test_text_only_export_layout(merged_text: Path) -> None:
    config = json.loads((merged_text / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForCausalLM"] and config["model_type"] == "gemma4_text"
    keys = set(load_file(merged_text / "model.safetensors"))
    assert all(k.startswith("model.") and ".language_model." not in k for k in keys)
    assert not any("tower" in k or "embed_vision" in k for k in keys)
    report = json.loads((merged_text / "merge_report.json").read_text())
    assert report["skipped_tower"] and report["skipped_tower_max_abs_b"] > 0 and not report["merged_tower"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (merged_text / name).exists(), name
    assert not (merged_text / "processor_config.json").exists()  # text only: no media processors


def test_merged_logits_equal_unmerged_peft_logits(
    demo: DemoPaths, merged_full: Path, merged_text: Path
) -> None:
    from transformers import Gemma4ForCausalLM

    ids = torch.tensor([[2, 5, 40, 41, 300, 512, 77, 6, 5, 100]])
    with torch.no_grad():
        expected = peft_model(demo.base, demo.adapter)(input_ids=ids).logits
        base_only = load_base(demo.base)(input_ids=ids).logits
        full = load_base(merged_full)(input_ids=ids).logits
        text = (
            Gemma4ForCausalLM.from_pretrained(merged_text, dtype=torch.float32).eval()(input_ids=ids).logits
        )
    assert (expected - base_only).abs().max() > 1e-2  # the adapter matters, so the check means something
    torch.testing.assert_close(full, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text, expected, atol=1e-4, rtol=1e-4)


def _adapter_copy(src: Path, dst: Path, *, config: dict | None = None, tensors: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        base = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**base, **config}))
    if tensors is not None:
        save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def _refusals(demo: DemoPaths, tmp: Path) -> dict[str, tuple[Path, str]]:
    lora = load_file(demo.adapter / "adapter_model.safetensors")
    q_a = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    wrong_shape = {**lora, q_a: torch.zeros(16, 7)}
    unknown = {
        **lora,
        "base_model.model.model.language_model.layers.0.self_attn.qkv.lora_A.weight": torch.zeros(16, 128),
        "base_model.model.model.language_model.layers.0.self_attn.qkv.lora_B.weight": torch.zeros(128, 16),
    }
    elsewhere = {
        k.replace("language_model.layers.0.", "language_model.layers.99."): v for k, v in lora.items()
    }
    return {
        "dora": (_adapter_copy(demo.adapter, tmp / "dora", config={"use_dora": True}), "DoRA"),
        "shape": (_adapter_copy(demo.adapter, tmp / "shape", tensors=wrong_shape), "q_proj"),
        "unknown-target": (_adapter_copy(demo.adapter, tmp / "unknown", tensors=unknown), "qkv"),
        "another-base": (_adapter_copy(demo.adapter, tmp / "other", tensors=elsewhere), "layers.99"),
        "not-lora": (_adapter_copy(demo.adapter, tmp / "ia3", config={"peft_type": "IA3"}), "IA3"),
        "rank-pattern": (
            _adapter_copy(demo.adapter, tmp / "rank", config={"rank_pattern": {"q_proj": 8}}),
            "r=8",
        ),
        "alora": (
            _adapter_copy(demo.adapter, tmp / "alora", config={"alora_invocation_tokens": [5, 6]}),
            "Activated LoRA",
        ),
        "lora-bias": (_adapter_copy(demo.adapter, tmp / "lbias", config={"lora_bias": True}), "lora_bias"),
        **{
            f"variant-{option}": (_adapter_copy(demo.adapter, tmp / option, config={option: value}), needle)
            for option, value, needle in (
                ("kasa_config", {"kasa_init": "svd"}, "KaSA"),
                ("use_bdlora", {"nblocks": 2, "target_modules_bd_a": ["q_proj"]}, "BD-LoRA"),
                ("arrow_config", {"top_k": 2}, "Arrow"),
            )
        },
        "two-adapters-in-one-file": (
            _adapter_copy(
                demo.adapter,
                tmp / "two",
                tensors={**lora, q_a.replace(".weight", ".other.weight"): lora[q_a].clone()},
            ),
            "twice",
        ),
        "missing": (tmp / "does-not-exist", "does-not-exist"),
        **{
            f"init-{init}": (
                _adapter_copy(demo.adapter, tmp / f"init-{init}", config={"init_lora_weights": init}),
                "path_initial_model_for_weight_conversion" if init != "loftq" else "LoftQ",
            )
            for init in ("pissa", "pissa_niter_4", "olora", "corda", "lora_ga", "loftq")
        },
        "init-unknown": (
            _adapter_copy(demo.adapter, tmp / "init-new", config={"init_lora_weights": "future_init"}),
            "init_lora_weights='future_init' is unknown",
        ),
        "config-not-json": (
            _broken(demo.adapter, tmp / "nojson", "adapter_config.json", b"{r: 16"),
            "not valid JSON",
        ),
        "config-not-object": (
            _broken(demo.adapter, tmp / "list", "adapter_config.json", b"[16]"),
            "JSON object",
        ),
        "weights-corrupt": (
            _broken(
                demo.adapter, tmp / "corrupt", "adapter_model.safetensors", b"\x10\0\0\0\0\0\0\0{not json}"
            ),
            "not a safetensors file",
        ),
        "rank-not-a-number": (_adapter_copy(demo.adapter, tmp / "rstr", config={"r": "16"}), "not a number"),
        "fan-in-fan-out": (
            _adapter_copy(demo.adapter, tmp / "conv1d", config={"fan_in_fan_out": True}),
            "fan_in_fan_out=true",
        ),
        "alpha-overflows-the-merge": (
            _adapter_copy(demo.adapter, tmp / "alpha-huge", config={"lora_alpha": 1e308}),
            "would hold",
        ),
        "alpha-beyond-any-float": (
            _adapter_copy(demo.adapter, tmp / "alpha-digits", config={"lora_alpha": 10**400}),
            "lora_alpha=1000000",
        ),
        "weights-bytes-after-the-last-tensor": (
            _broken(
                demo.adapter,
                tmp / "trailing",
                "adapter_model.safetensors",
                (demo.adapter / "adapter_model.safetensors").read_bytes() + bytes(8),
            ),
            "8 bytes after the last tensor",
        ),
        "config-a-fifo": (_fifo_config(demo.adapter, tmp / "fifo"), "is not a regular file"),
        "rslora-a-string": (
            _adapter_copy(demo.adapter, tmp / "rslora", config={"use_rslora": "false"}),
            "use_rslora='false' is not true or false",
        ),
        **{
            f"{option}-{what}": (
                _adapter_copy(demo.adapter, tmp / f"{option}-{what}", config={option: value}),
                needle,
            )
            for option, what, value, needle in (
                ("alpha_pattern", "bad-regex", {"q_proj[": 4}, "not a valid regular expression"),
                ("rank_pattern", "a-list", [["q_proj", 8]], "is not an object of pattern -> value"),
                ("target_modules", "bad-regex", "(q_proj", "not a valid regular expression"),
                ("target_modules", "a-number", 5, "neither a pattern nor a list"),
                ("exclude_modules", "a-list-of-numbers", [1], "holds 1, not a module name"),
                ("layers_to_transform", "a-string", "1", "neither a layer index nor a list"),
                ("layers_pattern", "bad-regex", "layers(", "not a valid regular expression"),
                ("fan_in_fan_out", "a-string", "false", "fan_in_fan_out='false' is not true or false"),
                ("use_dora", "a-string", "false", "use_dora='false' is not true or false"),
                ("lora_bias", "a-string", "false", "lora_bias='false' is not true or false"),
                ("use_qalora", "a-string", "no", "use_qalora='no' is not true or false"),
            )
        },
        **{
            f"{dtype}-lora-A": (
                _adapter_copy(
                    demo.adapter, tmp / f"{dtype}-tensor", tensors={**lora, q_a: lora[q_a].to(torch_dtype)}
                ),
                f"is {dtype}; LoRA weights are F16, BF16, F32 or F64",
            )
            for dtype, torch_dtype in (
                ("I64", torch.int64),
                ("BOOL", torch.bool),
                ("F8_E4M3", torch.float8_e4m3fn),
            )
        },
        **{
            f"{what}-in-lora-{half}": (
                _adapter_copy(demo.adapter, tmp / f"{what}{half}", tensors=_poisoned(lora, half, value)),
                f"adapter tensor '{_POISONED.format(half)}' holds 1 NaN or infinite values",
            )
            for what, value in (("nan", float("nan")), ("inf", float("inf")))
            for half in ("A", "B")
        },
    }


# The tensor _poisoned puts one non-finite value in.
_POISONED = "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_{}.weight"


def _poisoned(lora: dict[str, torch.Tensor], half: str, value: float) -> dict[str, torch.Tensor]:
    key = _POISONED.format(half)
    tensor = lora[key].clone()
    tensor[0, -1] = value
    return {**lora, key: tensor}


def _fifo_config(src: Path, dst: Path) -> Path:
    """An adapter whose adapter_config.json is a named pipe (a read would block for ever)."""
    import os

    shutil.copytree(src, dst)
    (dst / "adapter_config.json").unlink()
    os.mkfifo(dst / "adapter_config.json")
    return dst


def _broken(src: Path, dst: Path, name: str, content: bytes) -> Path:
    shutil.copytree(src, dst)
    (dst / name).write_bytes(content)
    return dst


# docs/bad-input.md's merge table (written by `python -m tests.test_bad_input`): each row is
# (the test that holds it, what the user gave, what they get). "refusal:CASE" is a case of
# test_refusals_are_one_line_nonzero_and_leave_no_output, any other name a test in this file.
MERGE_CATALOGUE: tuple[tuple[str, str, str], ...] = (
    ("refusal:missing", "`--adapter` a directory that does not exist", "exit 2, `no such directory (and not a hub id 'org/name')`"),
    ("test_hub_id_without_network_is_a_clear_error", "`--base google/gemma-4-E4B-it` with no network", "exit 2, `base 'google/gemma-4-E4B-it' is not a local directory and could not be fetched …`"),
    ("refusal:config-not-json", "an `adapter_config.json` that is not JSON", "exit 2, `… is not valid JSON (…)`"),
    ("refusal:config-a-fifo", "an `adapter_config.json` (or a base's `config.json` or index) that is a named pipe", "exit 2, `adapter config … is not a regular file` (no read that blocks for ever)"),
    ("refusal:config-not-object", "an `adapter_config.json` holding a list", "exit 2, `… is not a JSON object`"),
    ("refusal:weights-corrupt", "an `adapter_model.safetensors` with a broken header", "exit 2, `… is not a safetensors file (bad header length)`"),
    ("refusal:not-lora", "an IA3 adapter", "exit 2, `adapter peft_type 'IA3' is not LORA`"),
    ("refusal:dora", "a DoRA adapter", "exit 2, `adapter uses DoRA …`"),
    ("refusal:alora", "an Activated LoRA (`alora_invocation_tokens`)", "exit 2, `adapter uses Activated LoRA …`"),
    ("refusal:lora-bias", "`lora_bias: true`", "exit 2, `adapter uses lora_bias=true …`"),
    ("refusal:variant-kasa_config", "a KaSA adapter", "exit 2, `adapter uses KaSA …`"),
    ("refusal:variant-use_bdlora", "a BD-LoRA adapter", "exit 2, `adapter uses BD-LoRA …`"),
    ("refusal:variant-arrow_config", "an Arrow adapter", "exit 2, `adapter uses Arrow …`"),
    ("refusal:fan-in-fan-out", "`fan_in_fan_out: true`", "exit 2, `fan_in_fan_out=true (Conv1D layout), which Gemma 4 never uses`"),
    ("refusal:init-pissa", "`init_lora_weights: pissa`, not converted by PEFT when saved", "exit 2, `… changed the base weights before training …`, with the PEFT call that converts it"),
    ("refusal:init-pissa_niter_4", "`init_lora_weights: pissa_niter_4`", "exit 2, as `pissa`"),
    ("refusal:init-olora", "`init_lora_weights: olora`", "exit 2, as `pissa`"),
    ("refusal:init-corda", "`init_lora_weights: corda`", "exit 2, as `pissa`"),
    ("refusal:init-lora_ga", "`init_lora_weights: lora_ga`", "exit 2, as `pissa`"),
    ("refusal:init-loftq", "`init_lora_weights: loftq`", "exit 2, `… LoftQ trains against its own quantized base …`"),
    ("refusal:init-unknown", "`init_lora_weights: future_init`", "exit 2, `… is unknown to this merge …`, naming the inits it knows"),
    ("refusal:rank-not-a-number", "`r: \"16\"`", "exit 2, `… r='16' is not a number`"),
    ("refusal:rank-pattern", "a `rank_pattern` that disagrees with a tensor's rank", "exit 2, `… has rank 16 but its config says r=8 …`"),
    ("refusal:shape", "a `lora_A` of the wrong width", "exit 2, `shape mismatch for … adapter trained on another base?`"),
    ("refusal:unknown-target", "a LoRA pair on a module `target_modules` does not name", "exit 2, `… is not one PEFT would target …`"),
    ("refusal:another-base", "a LoRA pair on a layer the base lacks", "exit 2, `… has no weight in the base …`"),
    ("refusal:two-adapters-in-one-file", "one module's `lora_A` twice in the file", "exit 2, `adapter holds lora_A of … twice`"),
    ("refusal:nan-in-lora-A", "a NaN in a `lora_A`", "exit 2, `adapter tensor '…lora_A.weight' holds 1 NaN or infinite values`"),
    ("refusal:nan-in-lora-B", "a NaN in a `lora_B`", "exit 2, as above, naming the `lora_B`"),
    ("refusal:inf-in-lora-A", "an infinity in a `lora_A`", "exit 2, as above"),
    ("refusal:inf-in-lora-B", "an infinity in a `lora_B`", "exit 2, as above"),
    ("refusal:alpha-overflows-the-merge", "`lora_alpha: 1e308` (a merged weight overflows)", "exit 2, `merged weight '…' would hold NaN or infinite values (lora scale …, output …): the adapter's scale or factors are too large for it, --dtype too narrow, or the base value is not finite`"),
    ("refusal:alpha-beyond-any-float", "`lora_alpha` of 400 digits", "exit 2, `… lora_alpha=1000000… is not a number`"),
    ("refusal:weights-bytes-after-the-last-tensor", "an `adapter_model.safetensors` that safetensors refuses (here: bytes after its last tensor; every case of the base's shards below applies)", "exit 2, `adapter_model.safetensors: 8 bytes after the last tensor: corrupt file`"),
    ("refusal:fan_in_fan_out-a-string", "`fan_in_fan_out: \"false\"` (or any true/false option as a string)", "exit 2, `adapter fan_in_fan_out='false' is not true or false`"),
    ("refusal:use_dora-a-string", "`use_dora: \"false\"`", "exit 2, as above"),
    ("refusal:lora_bias-a-string", "`lora_bias: \"false\"`", "exit 2, as above"),
    ("refusal:use_qalora-a-string", "`use_qalora: \"no\"`", "exit 2, as above"),
    ("refusal:rslora-a-string", "`use_rslora: \"false\"`", "exit 2, `adapter use_rslora='false' is not true or false`"),
    ("refusal:alpha_pattern-bad-regex", "an `alpha_pattern` key that is not a regular expression", "exit 2, `adapter alpha_pattern holds 'q_proj[', not a valid regular expression (…)`"),
    ("refusal:rank_pattern-a-list", "a `rank_pattern` that is a list", "exit 2, `adapter rank_pattern=… is not an object of pattern -> value`"),
    ("refusal:target_modules-bad-regex", "a `target_modules` string that is not a regular expression", "exit 2, as for `alpha_pattern`"),
    ("refusal:target_modules-a-number", "`target_modules: 5`", "exit 2, `adapter target_modules=5 is neither a pattern nor a list of module names`"),
    ("refusal:exclude_modules-a-list-of-numbers", "`exclude_modules: [1]`", "exit 2, `adapter exclude_modules holds 1, not a module name`"),
    ("refusal:layers_to_transform-a-string", "`layers_to_transform: \"1\"`", "exit 2, `adapter layers_to_transform='1' is neither a layer index nor a list of them`"),
    ("refusal:layers_pattern-bad-regex", "a `layers_pattern` that is not a regular expression", "exit 2, as for `alpha_pattern`"),
    ("refusal:I64-lora-A", "an integer `lora_A`", "exit 2, `adapter tensor '…' is I64; LoRA weights are F16, BF16, F32 or F64`"),
    ("refusal:BOOL-lora-A", "a boolean `lora_A`", "exit 2, as above"),
    ("refusal:F8_E4M3-lora-A", "an fp8 `lora_A`", "exit 2, as above"),
    ("test_a_cast_beyond_the_dtypes_range_is_refused", "`--dtype fp16` of a base holding a value beyond fp16's range", "exit 2, `base tensor '…' holds values beyond F16's range (largest …): choose a --dtype that holds them, or leave --dtype out to keep the base's BF16`"),
    ("test_an_index_naming_files_outside_the_base_is_refused", "a base index naming `sub/x.safetensors`, `../x.safetensors` or an absolute path", "exit 2, `base index … names '…', not a file name in …`"),
    ("test_malformed_safetensors_headers_are_refused", "a base shard that safetensors itself would refuse: a negative, fractional or 2⁶³ dimension, a bool offset, overlapping tensors, a gap before or between them, bytes after the last, metadata that is not an object of strings, a byte-order mark, a dtype that is not a string", "exit 2, `… is not a safetensors file (…)` / `… overlaps another or leaves a gap before it: corrupt file` / `… bytes after the last tensor: corrupt file`"),
    ("test_base_configs_and_indexes_of_the_wrong_shape_are_refused", "a base `config.json` whose `quantization_config` is a string, whose `text_config` is no object (`--text-only`), or that transformers cannot read (`--base-weights nf4`); an index with an empty `weight_map`, or naming a directory or a FIFO", "exit 2, `base … is quantized (bnb)` / `has no text_config` / `has an empty weight_map` / `… is not a regular file`"),
    ("test_infinite_clip_bounds_are_copied_through_every_dtype", "a base whose clip bounds are ±inf (Gemma 4's defaults), any `--dtype`", "exit 0: a value never finite is copied as it is; only a finite value made infinite is refused"),
    ("test_a_nan_in_a_weight_only_nf4_touches_is_refused", "`--base-weights nf4` of a base with a NaN in a linear weight the adapter does not target", "exit 2, `merged weight '…' would hold NaN or infinite values …`"),
    ("test_an_index_naming_a_tensor_no_shard_holds_is_refused", "a base index naming a tensor no shard holds", "exit 2, `base index … puts tensor '…' in …, which does not hold it`"),
    ("test_a_sharded_base_whose_index_misplaces_or_repeats_a_tensor_is_refused", "a sharded base whose index puts a tensor in the other shard, or two shards holding one tensor", "exit 2, `… puts tensor '…' in …, which does not hold it` / `base tensor '…' is in both … and …`"),
    ("test_existing_output_needs_overwrite", "`--output` an existing directory, no `--overwrite`", "exit 2, the directory as it was"),
    ("test_an_output_inside_an_input_is_refused", "`--output` inside the base or adapter directory (with or without `--overwrite`)", "exit 2, `… is inside the base` / `adapter`; the inputs unchanged"),
    ("test_output_paths_an_unlucky_user_gives", "`--output` under a file, or `--overwrite` of a directory that holds an input or the working directory", "exit 2, `is not a directory` / `holds the adapter` / `holds the current directory`"),
    ("test_a_full_disk_names_the_file_being_written", "a disk that fills up during the merge", "exit 1, `No space left on device` naming the file being written; nothing left"),
    ("test_a_full_disk_while_config_json_is_written_names_it", "a disk that fills up while `config.json` (or the index, or the report) is written", "exit 1, `No space left on device: '…/config.json'`; nothing left"),
    ("test_a_full_disk_while_a_shard_is_written_names_the_shard", "a disk that fills up while a weights shard is written", "exit 1, `No space left on device: '…/model.safetensors'`; nothing left"),
)  # fmt: skip
REFUSALS = [row[0].removeprefix("refusal:") for row in MERGE_CATALOGUE if row[0].startswith("refusal:")]


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_nonzero_and_leave_no_output(
    case: str, demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter, needle = _refusals(demo, tmp_path)[case]
    out = tmp_path / "out" / "merged"
    code = _run("--base", str(demo.base), "--adapter", str(adapter), "--output", str(out))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists() and not out.parent.exists()  # not even the parent it would have made


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_leave_the_base_alone_are_merged(demo: DemoPaths, tmp_path: Path, init: object) -> None:
    adapter = _adapter_copy(demo.adapter, tmp_path / "adapter", config={"init_lora_weights": init})
    _, pairs = merge_adapter.load_adapter(adapter)
    assert len(pairs) == 34


def _args(demo: DemoPaths, out: Path, *extra: str) -> list[str]:
    return ["--base", str(demo.base), "--adapter", str(demo.adapter), "--output", str(out), *extra]


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_failure_after_planning_takes_back_the_directories_it_made(
    demo: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk while writing (any OSError): one line, and neither the staging directory nor
    the parents made for the output are left."""
    import errno

    def full(path: Path, *_: object) -> dict[str, float]:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(merge_adapter, "write_shard", full)
    out = tmp_path / "new" / "deeper" / "merged"
    assert _run(*_args(demo, out)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_file_being_written(
    demo: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """shutil's copy puts the source in filename and the destination in filename2: a full disk is
    about the destination, so that is the path the one line names."""
    import errno
    import os

    def full(*_: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    # The copies of the tokenizer files go through os.sendfile (shutil's fast copy on Linux).
    monkeypatch.setattr(os, "sendfile", full)
    out = tmp_path / "merged"
    assert _run(*_args(demo, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert f"{tmp_path}/.merged.partial-" in err[0] and err[0].endswith("; nothing was written"), err
    assert str(demo.base) not in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_an_index_naming_a_tensor_no_shard_holds_is_refused(
    demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers loads what the index names: a tensor it names that no shard holds makes the
    base incomplete, and the merge must not drop it silently."""
    base = tmp_path / "base"
    shutil.copytree(demo.base, base)
    with safe_open(base / "model.safetensors", framework="pt") as f:
        weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    lost = "model.language_model.layers.0.mlp.extra_proj.weight"
    index = {"metadata": {}, "weight_map": {**weight_map, lost: "model.safetensors"}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "merged"
    assert _run("--base", str(base), "--adapter", str(demo.adapter), "--output", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and repr(lost) in err[0] and "does not hold it" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    # The same index without the lost tensor merges.
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert _run("--base", str(base), "--adapter", str(demo.adapter), "--output", str(out)) == 0


def test_a_full_disk_while_a_shard_is_written_names_the_shard(
    demo: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A write() that fails carries no file name of its own: the line must still say which."""
    import errno

    from merge import write as merge_write

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge_write, "write_tensor", full)
    assert _run(*_args(demo, tmp_path / "merged")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert f"{tmp_path}/.merged.partial-" in err[0] and "model.safetensors" in err[0], err
    assert list(tmp_path.iterdir()) == []


def _base_copy(demo: DemoPaths, dst: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    shutil.copytree(demo.base, dst)
    if tensors is not None:
        with safe_open(dst / "model.safetensors", framework="pt") as f:
            metadata = f.metadata()
        save_file({**load_file(dst / "model.safetensors"), **tensors}, dst / "model.safetensors", metadata)
    return dst


def test_a_cast_beyond_the_dtypes_range_is_refused(
    demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bf16 value of 1e6 is inf in fp16 (largest 65504): a faithful cast of a value the model no
    longer has, so the merge refuses it rather than write an infinite weight."""
    name = "model.language_model.norm.weight"
    weights = load_file(demo.base / "model.safetensors")
    big = weights[name].clone()
    big[3] = 1e6
    base = _base_copy(demo, tmp_path / "base", {name: big})
    out = tmp_path / "merged"
    args = ["--base", str(base), "--adapter", str(demo.adapter), "--output", str(out)]
    assert _run(*args, "--dtype", "fp16") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"base tensor {name!r} holds values beyond F16's range" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert _run(*args, "--dtype", "fp32") == 0  # a dtype that holds it merges


@pytest.mark.parametrize(
    "where",
    ["sub/model.safetensors", "../base/model.safetensors", "ABSOLUTE", "", ".", "model\n.safetensors"],
)
def test_an_index_naming_files_outside_the_base_is_refused(
    where: str, demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers joins each index entry to the checkpoint directory: an entry that is a path
    names another checkpoint's shard (or two shards of one name), not one of this base's."""
    base = _base_copy(demo, tmp_path / "base")
    if where == "ABSOLUTE":
        where = str(base / "model.safetensors")
    with safe_open(base / "model.safetensors", framework="pt") as f:
        weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    first = next(iter(weight_map))
    (base / "sub").mkdir()
    shutil.copy(base / "model.safetensors", base / "sub" / "model.safetensors")
    index = {"metadata": {}, "weight_map": {**weight_map, first: where}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "merged"
    assert _run("--base", str(base), "--adapter", str(demo.adapter), "--output", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"names {where!r}, not a file name in {base}" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def _with_header(path: Path, change: Any = None, data: Any = None, prefix: bytes = b"") -> None:
    """Rewrite a safetensors file: its JSON header through ``change``, its data through ``data``
    (given the changed header and the old data), ``prefix`` before the header's JSON."""
    import struct

    blob = path.read_bytes()
    length = struct.unpack("<Q", blob[:8])[0]
    header, body = json.loads(blob[8 : 8 + length]), blob[8 + length :]
    if change is not None:
        change(header)
    if data is not None:
        body = data(header, body)
    new = prefix + json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + body)


def _shift_after(header: dict[str, Any], first: int, by: int) -> None:
    """Move every tensor from the ``first``-th (in file order) on by ``by`` bytes."""
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    for name in names[first:]:
        header[name]["data_offsets"] = [o + by for o in header[name]["data_offsets"]]


def _gap(first: int) -> Any:
    """8 bytes of nothing before the ``first``-th tensor (in file order)."""

    def data(header: dict[str, Any], body: bytes) -> bytes:
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        at = header[names[first]]["data_offsets"][0]
        _shift_after(header, first, 8)
        return body[:at] + bytes(8) + body[at:]

    return data


def _huge_empty(header: dict[str, Any]) -> None:
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["model.extra"] = {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [end, end]}


def _two_smallest(header: dict[str, Any]) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def _overlap(header: dict[str, Any]) -> None:
    first, second = _two_smallest(header)
    begin, end = header[second]["data_offsets"]
    shift = header[first]["data_offsets"][1] - header[first]["data_offsets"][0]
    header[second]["data_offsets"] = [begin - min(shift, begin), end - min(shift, begin)]


def _matrix(header: dict[str, Any]) -> dict[str, Any]:
    """The header entry of the first tensor (in file order) that has dimensions."""
    return next(header[k] for k in _two_smallest(header) + tuple(header) if header[k].get("shape"))


HEADER_DAMAGE: dict[str, tuple[dict[str, Any], str]] = {
    "negative-dimension": ({"change": lambda h: _matrix(h).update(shape=[-1, -4])}, "bad offsets or shape"),
    "fractional-dimension": ({"change": lambda h: _matrix(h).update(shape=[d + 0.5 for d in _matrix(h)["shape"]])}, "bad offsets or shape"),
    "a-dimension-beyond-int64": ({"change": _huge_empty}, "bad offsets or shape"),
    "bool-offset": ({"change": lambda h: _matrix(h).update(data_offsets=[False, _matrix(h)["data_offsets"][1]])}, "bad offsets or shape"),
    "overlapping-tensors": ({"change": _overlap}, "overlaps another or leaves a gap before it: corrupt file"),
    "a-gap-before-the-first-tensor": ({"data": _gap(0)}, "overlaps another or leaves a gap before it: corrupt file"),
    "a-gap-between-tensors": ({"data": _gap(1)}, "overlaps another or leaves a gap before it: corrupt file"),
    "bytes-after-the-last-tensor": ({"data": lambda h, body: body + bytes(8)}, "8 bytes after the last tensor: corrupt file"),
    "metadata-not-strings": ({"change": lambda h: h.update(__metadata__={"format": ["pt"]})}, "__metadata__ is not an object of strings"),
    "metadata-a-list": ({"change": lambda h: h.update(__metadata__=[])}, "__metadata__ is not an object of strings"),
    "a-byte-order-mark": ({"prefix": b"\xef\xbb\xbf"}, "header is not JSON"),
    "dtype-not-a-string": ({"change": lambda h: _matrix(h).update(dtype=["F32"])}, "unknown to this merge"),
}  # fmt: skip


@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGE))
def test_malformed_safetensors_headers_are_refused(
    damage: str, demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What safetensors itself would refuse is refused here, from the header, in one line."""
    how, needle = HEADER_DAMAGE[damage]
    base = _base_copy(demo, tmp_path / "base")
    _with_header(base / "model.safetensors", **how)
    out = tmp_path / "merged"
    assert _run("--base", str(base), "--adapter", str(demo.adapter), "--output", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def _sharded(demo: DemoPaths, dst: Path) -> tuple[Path, dict[str, str]]:
    """The demo base in two shards (half its tensors each) with the index that says so."""
    base = _base_copy(demo, dst)
    weights = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    names = sorted(weights)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2]), 1):
        file = f"model-0000{i}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, base / file, {"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return base, weight_map


def test_a_sharded_base_whose_index_misplaces_or_repeats_a_tensor_is_refused(
    demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tensor the index puts in the other shard, or a tensor two shards both hold: which one
    transformers would load is not the merge's to guess."""
    base, weight_map = _sharded(demo, tmp_path / "base")
    out = tmp_path / "merged"
    args = ["--base", str(base), "--adapter", str(demo.adapter), "--output", str(out)]
    assert _run(*args) == 0  # the sharded base as it is merges
    shutil.rmtree(out)
    name = next(n for n, f in weight_map.items() if f.startswith("model-00001"))
    misplaced = {**weight_map, name: "model-00002-of-00002.safetensors"}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": misplaced}))
    assert _run(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"puts tensor {name!r} in model-00002-of-00002.safetensors" in err[0], err
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    second = base / "model-00002-of-00002.safetensors"
    save_file({**load_file(second), name: load_file(base / weight_map[name])[name]}, second, {"format": "pt"})
    assert _run(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"base tensor {name!r} is in both" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_a_full_disk_while_config_json_is_written_names_it(
    demo: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno

    write_text = Path.write_text

    def full(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name == "config.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert _run(*_args(demo, tmp_path / "merged")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "config.json" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_top_level_r_and_alpha_that_every_pattern_overrides_are_not_used(
    demo: DemoPaths, tmp_path: Path
) -> None:
    """PEFT reads r and lora_alpha of a module from rank_pattern / alpha_pattern where a key
    matches: top-level values that no module takes (here r 0, alpha a string) must not matter."""
    config = {"r": 0, "lora_alpha": "x", "rank_pattern": {".*": 16}, "alpha_pattern": {".*": 32}}
    adapter = _adapter_copy(demo.adapter, tmp_path / "adapter", config=config)
    out = tmp_path / "merged"
    assert (
        _run("--base", str(demo.base), "--adapter", str(adapter), "--output", str(out), "--dtype", "fp32")
        == 0
    )
    report = json.loads((out / "merge_report.json").read_text())
    assert report["scale"] is None and set(report["scale_overrides"].values()) == {2.0}


@pytest.mark.parametrize(
    ("config", "pairs"),
    [({"target_modules": "ALL-LINEAR"}, 34), ({"use_rslora": None, "exclude_modules": None}, 34)],
)
def test_config_values_peft_takes_are_taken(
    demo: DemoPaths, tmp_path: Path, config: dict, pairs: int
) -> None:
    """PEFT lowercases all-linear and reads null options as their defaults."""
    adapter = _adapter_copy(demo.adapter, tmp_path / "adapter", config=config)
    assert len(merge_adapter.load_adapter(adapter)[1]) == pairs


def test_base_configs_and_indexes_of_the_wrong_shape_are_refused(
    demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A quantization_config that is a string, a text_config that is a list (--text-only), an
    empty weight_map, an index naming a directory or a FIFO: one line each, never a traceback or a hang."""
    import os

    base = _base_copy(demo, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    with safe_open(base / "model.safetensors", framework="pt") as f:
        weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    (base / "sub").mkdir()
    cases = [
        ({**config, "quantization_config": "bnb"}, None, (), "is quantized (bnb)"),
        ({**config, "text_config": [1]}, None, ("--text-only",), "has no text_config"),
        (config, {}, (), "has an empty weight_map"),
        ({**config, "architectures": [5]}, None, ("--base-weights", "nf4"), "base architecture 5 is unknown"),
        (
            {**config, "model_type": "no_such_model"},
            None,
            ("--base-weights", "nf4"),
            "not one transformers reads",
        ),
        (config, {**weight_map, next(iter(weight_map)): "sub"}, (), "sub is not a regular file"),
        (
            config,
            {**weight_map, next(iter(weight_map)): "pipe.safetensors"},
            (),
            "pipe.safetensors is not a regular file",
        ),
        (config, None, (), "pipe.safetensors is not a regular file"),  # found by *.safetensors
    ]
    out = tmp_path / "merged"
    for base_config, index, extra, needle in cases:
        if "pipe" in needle and not (base / "pipe.safetensors").exists():
            os.mkfifo(base / "pipe.safetensors")
        (base / "config.json").write_text(json.dumps(base_config))
        (base / "model.safetensors.index.json").unlink(missing_ok=True)
        if index is not None:
            (base / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": index})
            )
        assert _run("--base", str(base), "--adapter", str(demo.adapter), "--output", str(out), *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (needle, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_a_zero_size_tensor_sharing_an_offset_is_a_valid_shard(demo: DemoPaths, tmp_path: Path) -> None:
    """safetensors lets a tensor of no bytes start where the next one starts, whatever the order
    of the header: the data is still contiguous."""
    base = _base_copy(demo, tmp_path / "base")

    def empty_last(header: dict[str, Any]) -> None:  # last in the header, first at its offset
        start = header[_two_smallest(header)[1]]["data_offsets"][0]
        header["model.empty"] = {"dtype": "F32", "shape": [0, 4], "data_offsets": [start, start]}

    _with_header(base / "model.safetensors", empty_last)
    out = tmp_path / "merged"
    assert _run("--base", str(base), "--adapter", str(demo.adapter), "--output", str(out)) == 0
    assert load_file(out / "model.safetensors")["model.empty"].shape == (0, 4)


def test_the_report_gives_the_scale_of_the_modules_no_pattern_overrides(
    demo: DemoPaths, merged_full: Path
) -> None:
    config = json.loads((demo.adapter / "adapter_config.json").read_text())
    report = json.loads((merged_full / "merge_report.json").read_text())
    assert report["scale"] == config["lora_alpha"] / config["r"] and report["scale_overrides"] == {}


def test_infinite_clip_bounds_are_copied_through_every_dtype(demo: DemoPaths, tmp_path: Path) -> None:
    """Gemma 4's ClippableLinear bounds default to +-inf: a copy (or cast) of a value that was
    never finite is faithful, and only a finite value made infinite is refused."""
    weights = load_file(demo.base / "model.safetensors")
    bounds = {k: torch.full_like(v, float("inf") if k.endswith("_max") else float("-inf"))
              for k, v in weights.items() if k.endswith(("input_max", "input_min", "output_max", "output_min"))}  # fmt: skip
    assert bounds
    base = _base_copy(demo, tmp_path / "base", bounds)
    for dtype in ("fp16", "fp32", "bf16"):
        out = tmp_path / dtype
        assert (
            _run("--base", str(base), "--adapter", str(demo.adapter), "--output", str(out), "--dtype", dtype)
            == 0
        )
        merged = load_file(out / "model.safetensors")
        assert all(torch.equal(merged[k].float(), v.float()) for k, v in bounds.items()), dtype


@pytest.mark.parametrize("dtype", [[], ["--dtype", "fp32"]])  # written whole, or cast a block at a time
def test_a_nan_in_a_weight_only_nf4_touches_is_refused(
    dtype: list[str], demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--base-weights nf4 round-trips the language model's linears the adapter does not target too
    (per_layer_input_gate here): a NaN there is no weight to write either."""
    name = "model.language_model.layers.0.per_layer_input_gate.weight"
    weights = load_file(demo.base / "model.safetensors")
    poisoned = weights[name].clone()
    poisoned[0, 0] = float("nan")
    base = _base_copy(demo, tmp_path / "base", {name: poisoned})
    out = tmp_path / "merged"
    args = [
        "--base",
        str(base),
        "--adapter",
        str(demo.adapter),
        "--output",
        str(out),
        "--base-weights",
        "nf4",
    ]
    assert _run(*args, *dtype) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"merged weight {name!r} would hold NaN" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_an_fp64_base_is_merged_in_fp64(demo: DemoPaths, tmp_path: Path) -> None:
    """An F64 base kept as F64 (no --dtype) is not rounded through fp32 on the way."""
    weights = load_file(demo.base / "model.safetensors")
    base = _base_copy(
        demo, tmp_path / "base", {k: v.double() for k, v in weights.items() if v.is_floating_point()}
    )
    out = tmp_path / "merged"
    assert _run("--base", str(base), "--adapter", str(demo.adapter), "--output", str(out)) == 0
    _, pairs = merge_adapter.load_adapter(demo.adapter)
    module = "model.language_model.layers.0.self_attn.q_proj"
    pair = pairs[module]
    w = load_file(base / "model.safetensors")[f"{module}.weight"]
    expected = w + pair.scale * (pair.b.double() @ pair.a.double())
    got = load_file(out / "model.safetensors")[f"{module}.weight"]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_an_output_inside_an_input_is_refused(
    demo: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = (
        shutil.copytree(demo.base, tmp_path / "base"),
        _adapter_copy(demo.adapter, tmp_path / "lora"),
    )
    before = {p: sorted(q.name for q in p.iterdir()) for p in (base, adapter)}
    for out, what in ((base / "merged", "base"), (adapter / "deeper" / "merged", "adapter")):
        for extra in ((), ("--overwrite",)):
            args = ["--base", str(base), "--adapter", str(adapter), "--output", str(out), *extra]
            assert _run(*args) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"is inside the {what}" in err[0], err
    # The same directories reached through a symlink, or relative to the working directory.
    (tmp_path / "link").symlink_to(base)
    monkeypatch.chdir(tmp_path)
    for given_base, out in (
        ("link", "base/merged"),
        ("base", "link/merged"),
        ("./link/", "./base/x/../merged"),
    ):
        assert _run("--base", given_base, "--adapter", "lora", "--output", out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is inside the base" in err[0], (given_base, out, err)
    assert {p: sorted(q.name for q in p.iterdir()) for p in (base, adapter)} == before


@pytest.mark.parametrize("text_only", [False, True])
@pytest.mark.parametrize(("dtype", "name"), [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")])
def test_config_dtype_follows_the_output_dtype(
    demo: DemoPaths, tmp_path: Path, dtype: str, name: str, text_only: bool
) -> None:
    """transformers' dtype="auto" (and vLLM) load the weights as config.json's dtype says."""
    out = tmp_path / "merged"
    assert _run(*_args(demo, out, "--dtype", dtype, *(("--text-only",) if text_only else ()))) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == name
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {
            {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}[dtype]
        }


def test_sigterm_during_a_merge_leaves_nothing(
    demo: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import signal

    right = merge_adapter.write_shard

    def killed(*args: object) -> dict[str, float]:
        os.kill(os.getpid(), signal.SIGTERM)
        return right(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(merge_adapter, "write_shard", killed)
    assert _run(*_args(demo, tmp_path / "new" / "merged")) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0], err
    assert list(tmp_path.iterdir()) == []


def _holding_lock(path: Path) -> int:
    """An open, flocked descriptor on ``path``: a live merge in another PID namespace."""
    import fcntl
    import os

    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_leftovers_of_killed_runs_are_cleaned_and_a_live_run_is_left_alone(
    demo: DemoPaths, tmp_path: Path
) -> None:
    import os

    dead, out = _dead_pid(), tmp_path / "merged"
    stale = tmp_path / f".merged.partial-{dead}-0a1b2c3d"
    live = tmp_path / f".merged.partial-{os.getpid()}-4e5f6a7b"
    # A run whose PID means nothing here (another PID namespace) but which holds its lock.
    elsewhere = tmp_path / f".merged.partial-{dead}-8c9d0e1f"
    other = tmp_path / f".other.partial-{dead}-2a3b4c5d"
    for directory in (stale, live, elsewhere, other):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"half")
    # Names like ours that a user gave their own things, and a link named like a staging.
    users = tmp_path / "users"
    users.mkdir()
    (users / "keep").write_text("x")
    lookalikes = [f".merged.old-{dead}-backup", f".merged.partial-{dead}", f".merged.partial-{dead}-notours"]
    for name in lookalikes:
        (tmp_path / name).mkdir()
    link = tmp_path / f".merged.partial-{dead}-3e4f5a6b"
    link.symlink_to(users, target_is_directory=True)
    lock = _holding_lock(elsewhere)
    try:
        assert _run(*_args(demo, out)) == 0
    finally:
        os.close(lock)
    kept = ["merged", "users", live.name, elsewhere.name, other.name, link.name, *lookalikes]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert (users / "keep").read_text() == "x"

    # Killed between moving the old output aside and moving the new one in: the old one is put
    # back when there is no output (and then needs --overwrite like any output), and dropped
    # when there is one.
    for path in (live, elsewhere, link):
        shutil.rmtree(path) if not path.is_symlink() else path.unlink()
    out.rename(tmp_path / f".merged.old-{dead}")
    assert _run(*_args(demo, out)) != 0
    assert out.is_dir() and (out / "model.safetensors").exists()
    assert _run(*_args(demo, out, "--overwrite")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", "users", other.name, *lookalikes])
    out.rename(tmp_path / f".merged.old-{dead}")
    out.mkdir()
    assert _run(*_args(demo, out, "--overwrite")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", "users", other.name, *lookalikes])


def test_leftovers_of_another_user_are_left_alone(demo: DemoPaths, tmp_path: Path) -> None:
    import os

    if os.getuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    theirs = tmp_path / f".merged.partial-{_dead_pid()}-0a1b2c3d"
    theirs.mkdir()
    os.chown(theirs, 54321, 54321)
    assert _run(*_args(demo, tmp_path / "merged")) == 0
    assert theirs.is_dir()


def test_a_signal_while_the_output_is_replaced_never_loses_it(
    demo: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM (or Ctrl-C) between moving the old output aside and moving the new one in waits
    until the new one is in: the output is never missing, nothing is left beside it."""
    import os
    import signal

    out = tmp_path / "merged"
    out.mkdir()
    (out / "old").write_text("x")
    rename = Path.rename

    def interrupted(self: Path, target: Path) -> Path:
        if self == out:
            os.kill(os.getpid(), signal.SIGTERM)
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    code = _run(*_args(demo, out, "--overwrite"))
    assert code == 128 + signal.SIGTERM and "interrupted" in capsys.readouterr().err
    assert (out / "model.safetensors").exists() and not (out / "old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_output_paths_an_unlucky_user_gives(
    demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    # Under a file: one line, exit != 0, the file as it was.
    for out in (a_file / "merged", a_file / "deeper" / "merged"):
        assert _run(*_args(demo, out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a directory" in err[0], err
    assert a_file.read_text() == "keep"
    # A file without --overwrite is kept; with it, replaced by the merge, nothing left beside it.
    assert _run(*_args(demo, a_file)) == 2 and a_file.read_text() == "keep"
    capsys.readouterr()
    assert _run(*_args(demo, a_file, "--overwrite")) == 0
    assert (a_file / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    # --overwrite of a directory holding an input (or this process's working directory) is refused.
    work = tmp_path / "work"
    adapter = _adapter_copy(demo.adapter, work / "adapter")
    for out in (work, adapter):
        args = ["--base", str(demo.base), "--adapter", str(adapter), "--output", str(out), "--overwrite"]
        assert _run(*args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds the adapter" in err[0], err
    assert (adapter / "adapter_model.safetensors").exists()
    (tmp_path / "outer" / "here").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "outer" / "here")
    for out in (Path("."), Path("..")):
        assert _run(*_args(demo, out, "--overwrite")) == 2
        assert "holds the current directory" in capsys.readouterr().err
    assert (tmp_path / "outer" / "here").is_dir()


def test_existing_output_needs_overwrite(demo: DemoPaths, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep").write_text("x")
    args = ["--base", str(demo.base), "--adapter", str(demo.adapter), "--output", str(out)]
    assert _run(*args) == 2 and (out / "keep").exists()
    assert _run(*args, "--overwrite") == 0
    assert not (out / "keep").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_hub_id_without_network_is_a_clear_error(
    demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _run(
        "--base", "google/gemma-4-E4B-it", "--adapter", str(demo.adapter), "--output", str(tmp_path / "o")
    )
    err = capsys.readouterr().err
    assert code == 2 and "google/gemma-4-E4B-it" in err and len(err.strip().splitlines()) == 1


def test_the_merge_catalogue_names_tests_that_exist(demo: DemoPaths, tmp_path: Path) -> None:
    """Every refusal case is in docs/bad-input.md, and every row of it is held by a test."""
    assert sorted(REFUSALS) == sorted(_refusals(demo, tmp_path))
    names = [row[0] for row in MERGE_CATALOGUE]
    assert len(names) == len(set(names))
    assert all(globals()[n].__name__ == n for n in names if not n.startswith("refusal:"))
