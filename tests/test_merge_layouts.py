"""merge_adapter.py on a multi-shard base and on an rsLoRA adapter with rank/alpha patterns, against PEFT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge_adapter
from merge import lora
from serve.demo_model import DemoPaths
from tests.peft_oracle import load_base, peft_model

IDS = torch.tensor([[2, 5, 40, 41, 300, 512, 77, 6, 5, 100]])


def _run(*args: str) -> int:
    return merge_adapter.main(list(args))


def _state(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _index(directory: Path) -> dict[str, str]:
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.fixture(scope="module")
def sharded_base(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo base re-saved by transformers in shards of at most 400 kB."""
    out = tmp_path_factory.mktemp("sharded") / "base"
    load_base(demo.base).to(torch.bfloat16).save_pretrained(out, max_shard_size="400KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy2(demo.base / name, out / name)
    return out


def test_sharded_base_is_the_demo_base(demo: DemoPaths, sharded_base: Path) -> None:
    files = set(_index(sharded_base).values())
    assert len(files) >= 3 and not (sharded_base / "model.safetensors").exists()
    original, resharded = load_file(demo.base / "model.safetensors"), _state(sharded_base)
    # save_pretrained writes what transformers loads: not the KV-shared layers' k/v the checkpoint ships.
    assert set(resharded) == set(original) & set(load_base(demo.base).state_dict())
    assert all(torch.equal(original[k], resharded[k]) for k in resharded)


def test_multi_shard_full_merge_equals_peft_and_keeps_the_layout(
    demo: DemoPaths, sharded_base: Path, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    assert (
        _run(
            "--base",
            str(sharded_base),
            "--adapter",
            str(demo.adapter),
            "--output",
            str(out),
            "--dtype",
            "fp32",
        )
        == 0
    )

    base_map, out_map = _index(sharded_base), _index(out)
    assert out_map == base_map  # every tensor in the shard it came from, under the same file name
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(base_map.values()))
    for file in out.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            assert {k for k in f.keys()} == {k for k, v in out_map.items() if v == file.name}
    size = sum(t.numel() * t.element_size() for t in _state(out).values())
    assert json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"] == size

    reference = peft_model(sharded_base, demo.adapter).merge_and_unload().state_dict()
    reference.pop("lm_head.weight")
    ours = _state(out)
    assert set(ours) == set(reference)
    for key, ref in reference.items():
        torch.testing.assert_close(ours[key], ref, rtol=0, atol=1e-6, msg=key)
    report = json.loads((out / "merge_report.json").read_text())
    assert len(report["merged"]) == 24 and len(report["merged_tower"]) == 10


def test_multi_shard_text_only_merge_verifies_and_serves_the_right_logits(
    demo: DemoPaths, sharded_base: Path, tmp_path: Path
) -> None:
    from transformers import Gemma4ForCausalLM

    out = tmp_path / "text"
    args = ["--base", str(sharded_base), "--adapter", str(demo.adapter), "--output", str(out)]
    assert _run(*args, "--dtype", "fp32", "--text-only", "--verify") == 0
    weight_map = _index(out)
    assert all(k.startswith("model.") and "tower" not in k and "language_model" not in k for k in weight_map)
    assert set(weight_map.values()) == {p.name for p in out.glob("*.safetensors")}
    assert set(weight_map) == set(_state(out))
    report = json.loads((out / "merge_report.json").read_text())
    assert report["verification"]["ok"] and report["verification"]["within_fp32_tolerance"]

    with torch.no_grad():
        expected = peft_model(sharded_base, demo.adapter)(input_ids=IDS).logits
        text = Gemma4ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(input_ids=IDS).logits
    torch.testing.assert_close(text, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# rsLoRA with rank_pattern and alpha_pattern

RANK_PATTERN = {
    "language_model.layers.1.mlp.down_proj": 8,
    r"language_model\.layers\.[23]\.self_attn\.q_proj": 4,
}
ALPHA_PATTERN = {"language_model.*o_proj": 64, "language_model.layers.0.mlp.gate_proj": 4}


def _patterned_adapter(demo: DemoPaths, out: Path, **config: object) -> Path:
    """The demo adapter with ``config`` merged into its adapter_config.json, and new tensors of
    the right rank where ``rank_pattern`` changes a module's rank."""
    shutil.copytree(demo.adapter, out)
    tensors = load_file(out / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(7)
    rank_pattern = config.get("rank_pattern") or {}
    assert isinstance(rank_pattern, dict)
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        rank = lora._pattern_value(rank_pattern, module, 16)
        if rank != 16:
            b_key = key.replace("lora_A", "lora_B")
            in_f, out_f = tensors[key].shape[1], tensors[b_key].shape[0]
            tensors[key] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            tensors[b_key] = torch.randn(out_f, rank, generator=gen) * 0.02
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    base_config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**base_config, **config}, indent=2))
    return out


@pytest.fixture(scope="module")
def rslora_adapter(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo adapter with use_rslora and per-module ranks and alphas (new tensors where the rank
    changes). The patterns name language-model modules only: PEFT, as the oracle wraps the towers'
    inner `.linear`, would not match tower patterns the way the model card's patched names do."""
    out = tmp_path_factory.mktemp("rslora") / "adapter"
    return _patterned_adapter(
        demo, out, use_rslora=True, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN
    )


def test_rslora_with_patterns_equals_peft(demo: DemoPaths, rslora_adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    args = [
        "--base",
        str(demo.base),
        "--adapter",
        str(rslora_adapter),
        "--output",
        str(out),
        "--dtype",
        "fp32",
    ]
    assert _run(*args, "--verify") == 0

    report = json.loads((out / "merge_report.json").read_text())
    assert report["use_rslora"] and report["scale"] == 16 / 16**0.5
    overrides = report["scale_overrides"]
    lm = "model.language_model.layers"
    assert overrides[f"{lm}.0.self_attn.o_proj"] == pytest.approx(64 / 16**0.5)
    assert overrides[f"{lm}.1.mlp.down_proj"] == pytest.approx(16 / 8**0.5)
    assert overrides[f"{lm}.3.self_attn.q_proj"] == pytest.approx(16 / 4**0.5)
    assert overrides[f"{lm}.0.mlp.gate_proj"] == pytest.approx(4 / 16**0.5)
    assert report["verification"]["ok"]

    model = peft_model(demo.base, rslora_adapter)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    reference = model.merge_and_unload().state_dict()
    reference.pop("lm_head.weight")
    ours = load_file(out / "model.safetensors")
    for key, ref in reference.items():
        torch.testing.assert_close(ours[key], ref, rtol=0, atol=1e-6, msg=key)
    with torch.no_grad():
        merged = load_base(out)(input_ids=IDS).logits
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)


def test_patterns_apply_to_the_names_the_adapter_was_trained_under(demo: DemoPaths, tmp_path: Path) -> None:
    """A pattern naming `q_proj` reaches the towers' q_proj too: under the model card's patch that
    is the module's name during training (its weight is `.linear.weight` only in the base)."""
    adapter = tmp_path / "adapter"
    shutil.copytree(demo.adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {"q_proj": 32}}))
    _, pairs = merge_adapter.load_adapter(adapter)
    tower = [p for m, p in pairs.items() if "vision_tower" in m and m.endswith("q_proj")]
    assert tower and all(p.scale == 2.0 for p in tower)
    assert pairs["model.language_model.layers.0.self_attn.k_proj"].scale == 1.0


# ---------------------------------------------------------------------------------------------
# The scale --verify expects is derived apart from load_adapter(): PEFT's, or a second reading of
# adapter_config.json. Both are held to PEFT here, and a wrong scale from load_adapter must fail.

SCALE_CASES: dict[str, dict[str, object]] = {
    "alpha/r is 0.5": {"lora_alpha": 8},
    "rank_pattern without rsLoRA": {"rank_pattern": RANK_PATTERN},
    "alpha_pattern": {"lora_alpha": 12, "alpha_pattern": ALPHA_PATTERN},
    "all three": {"lora_alpha": 8, "rank_pattern": RANK_PATTERN, "alpha_pattern": ALPHA_PATTERN},
}


CONFIG_SCALE_CASES: dict[str, dict[str, object]] = {
    "rsLoRA": {"r": 16, "lora_alpha": 8, "use_rslora": True},
    "rsLoRA with patterns": {
        "r": 16, "lora_alpha": 32, "use_rslora": True,
        "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"o_proj": 64},
    },
    "the first matching key wins": {"alpha_pattern": {r"layers\.0\.self_attn\.q_proj": 4, "q_proj": 64}},
    "the first matching key wins, reversed": {"alpha_pattern": {"q_proj": 64, r"layers\.0\.self_attn\.q_proj": 4}},
    "a key matching inside the name only": {"alpha_pattern": {"self_attn": 64}, "rank_pattern": {"layers": 2}},
    "a key matching a part of a segment": {"alpha_pattern": {"proj": 64, "_proj": 32}},
    "PEFT's defaults": {},
    "r alone": {"r": 4},
    "lora_alpha alone": {"lora_alpha": 3},
}  # fmt: skip
CONFIG_SCALE_MODULES = [
    f"model.language_model.layers.{layer}.{module}"
    for layer in (0, 1, 12)
    for module in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
]


@pytest.mark.parametrize("case", list(CONFIG_SCALE_CASES))
def test_the_second_reading_of_scales_equals_peft(tmp_path: Path, case: str) -> None:
    """--verify's own reading of adapter_config.json (used where PEFT is not installed), against
    PEFT's LoraConfig, on the rules a second reading could get wrong: rsLoRA's square root, which
    pattern key decides (the first that matches a dotted tail of the name), and PEFT's defaults."""
    from merge import scales

    config = {
        "peft_type": "LORA",
        "target_modules": ["q_proj", "o_proj", "down_proj"],
        **CONFIG_SCALE_CASES[case],
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    expected = scales.peft_scales(tmp_path, CONFIG_SCALE_MODULES)
    assert scales.config_scales(config, CONFIG_SCALE_MODULES) == pytest.approx(expected, rel=1e-12)
    # Keys that match only inside a name (not a dotted tail) decide nothing: the plain alpha / r.
    if "inside" in case or "part of" in case:
        assert set(expected.values()) == {1.0}


@pytest.mark.parametrize("case", list(SCALE_CASES))
def test_scales_equal_peft(demo: DemoPaths, tmp_path: Path, case: str) -> None:
    """The merge, and both of --verify's readings of the scale, against PEFT's own model."""
    from merge import scales

    adapter = _patterned_adapter(demo, tmp_path / "adapter", **SCALE_CASES[case])
    out = tmp_path / "merged"
    args = ["--base", str(demo.base), "--adapter", str(adapter), "--output", str(out), "--dtype", "fp32"]
    assert _run(*args, "--verify") == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["verification"]["ok"] and report["verification"]["weights"]["scale_source"] == "peft"

    model = peft_model(demo.base, adapter)
    peft_scaling = {
        name.removeprefix("base_model.model.").removesuffix(".linear"): module.scaling["default"]
        for name, module in model.named_modules()
        if isinstance(getattr(module, "scaling", None), dict) and "language_model" in name
    }
    config, pairs = merge_adapter.load_adapter(adapter)
    modules = sorted(peft_scaling)
    assert len(modules) == 24  # every language-model LoRA layer
    assert {m: pairs[m].scale for m in modules} == pytest.approx(peft_scaling, rel=1e-12)
    assert scales.peft_scales(adapter, modules) == pytest.approx(peft_scaling, rel=1e-12)
    assert scales.config_scales(config, modules) == pytest.approx(peft_scaling, rel=1e-12)
    assert len(set(peft_scaling.values())) > 1 or case == "alpha/r is 0.5"

    reference = model.merge_and_unload().state_dict()
    reference.pop("lm_head.weight")
    ours = load_file(out / "model.safetensors")
    for key, ref in reference.items():
        torch.testing.assert_close(ours[key], ref, rtol=0, atol=1e-6, msg=key)


def _wrong_scale(kind: str, config: dict[str, object], module: str) -> float:
    """The scale a load_adapter() with one of the bugs --verify once shared would give."""
    r, alpha = config["r"], config["lora_alpha"]
    assert isinstance(r, int) and isinstance(alpha, int)
    mod_r = lora._pattern_value(config.get("rank_pattern") or {}, module, r)
    mod_alpha = lora._pattern_value(config.get("alpha_pattern") or {}, module, alpha)
    return {
        "alpha // r": mod_alpha // mod_r,
        "rank_pattern ignored": mod_alpha / r,
        "alpha_pattern ignored": alpha / mod_r,
    }[kind]


@pytest.mark.parametrize("source", ["peft", "adapter_config.json"])
@pytest.mark.parametrize("kind", ["none", "alpha // r", "rank_pattern ignored", "alpha_pattern ignored"])
def test_verify_does_not_share_load_adapters_scale(
    demo: DemoPaths,
    tmp_path: Path,
    kind: str,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A scale bug in load_adapter() (these each exited 0 with "verified") fails --verify, with
    PEFT's scales or, without PEFT, with the second reading of adapter_config.json."""
    import dataclasses

    from merge import scales

    adapter = _patterned_adapter(demo, tmp_path / "adapter", **SCALE_CASES["all three"])
    if source != "peft":
        monkeypatch.setattr(scales, "peft_available", lambda: False)
    right = merge_adapter.load_adapter

    def planted(path: Path) -> tuple[dict[str, object], dict[str, merge_adapter.LoraPair]]:
        config, pairs = right(path)
        if kind != "none":
            pairs = {m: dataclasses.replace(p, scale=_wrong_scale(kind, config, m)) for m, p in pairs.items()}
        return config, pairs

    monkeypatch.setattr(merge_adapter, "load_adapter", planted)
    out = tmp_path / "merged"
    args = ["--base", str(demo.base), "--adapter", str(adapter), "--output", str(out)]
    code = _run(*args, "--dtype", "fp32", "--text-only", "--verify")
    err = capsys.readouterr().err.strip().splitlines()
    if kind == "none":
        assert code == 0, err
        report = json.loads((out / "merge_report.json").read_text())
        assert report["verification"]["weights"]["scale_source"] == source
        return
    assert code != 0
    assert len(err) == 1 and "verification failed: scales WRONG" in err[0] and source in err[0], err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Which modules an adapter's config targets, and which pattern key gives a module its rank/alpha:
# PEFT's own functions as the oracle, on the names Gemma 4 has and on near misses.

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE_NAMES = [
    *(f"model.language_model.layers.{i}.self_attn.{p}" for i in (0, 1, 2, 10, 41) for p in PROJECTIONS[:4]),
    *(f"model.language_model.layers.{i}.mlp.{p}" for i in (0, 1, 12) for p in PROJECTIONS[4:]),
    *(f"model.vision_tower.encoder.layers.{i}.self_attn.{p}" for i in (0, 1) for p in PROJECTIONS[:4]),
    *(f"model.audio_tower.layers.{i}.feed_forward1.ffw_layer_1" for i in (0, 3)),
    "model.audio_tower.layers.0.self_attn.q_proj",
    "model.language_model.layers.1.self_attn.q_proj_extra",
    "model.language_model.layers.1.self_attn.xq_proj",
    "model.language_model.per_layer_model_projection",
    "model.embed_vision.embedding_projection",
    "q_proj",
    "lm_head",
]
TARGET_SPECS: list[dict[str, object]] = [
    {"target_modules": "q_proj"},
    {"target_modules": r".*q_proj"},
    {"target_modules": r"proj"},
    {"target_modules": r".*\.(q|v)_proj"},
    {"target_modules": r"language_model.*\.(q|v)_proj"},
    {"target_modules": r".*language_model.*\.(q|v)_proj"},
    {"target_modules": r".*layers\.1\..*"},
    {"target_modules": r"(q|k)_proj$"},
    {"target_modules": r"model\.language_model\.layers\.\d+\.self_attn\.q_proj"},
    {"target_modules": r".*(self_attn|mlp)\.\w+_proj"},
    {"target_modules": ["q_proj"]},
    {"target_modules": ["proj"]},
    {"target_modules": ["self_attn.q_proj", "down_proj"]},
    {"target_modules": ["layers.1.mlp.down_proj", "lm_head"]},
    {
        "target_modules": ["q_proj", "v_proj"],
        "exclude_modules": ["vision_tower.encoder.layers.0.self_attn.q_proj"],
    },
    {"target_modules": list(PROJECTIONS), "exclude_modules": r".*(vision|audio)_tower.*"},
    {"target_modules": r".*_proj", "exclude_modules": r"vision"},
    {"target_modules": list(PROJECTIONS), "layers_to_transform": [1, 41]},
    {"target_modules": list(PROJECTIONS), "layers_to_transform": 0, "layers_pattern": "layers"},
    {
        "target_modules": list(PROJECTIONS),
        "layers_to_transform": [1],
        "layers_pattern": ["encoder.layers", "h"],
    },
    {"target_modules": r".*q_proj", "layers_to_transform": [1]},  # ignored for a regex, as in PEFT
]


@pytest.mark.parametrize("spec", TARGET_SPECS, ids=lambda spec: repr(sorted(spec.items())))
def test_targeting_follows_peft(spec: dict[str, object]) -> None:
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    config = SimpleNamespace(
        target_modules=spec["target_modules"],
        exclude_modules=spec.get("exclude_modules"),
        layers_to_transform=spec.get("layers_to_transform"),
        layers_pattern=spec.get("layers_pattern"),
        modules_to_save=None,
        target_parameters=None,
    )
    for name in MODULE_NAMES:
        found = check_target_module_exists(config, name)
        peft_says = bool(found) and not isinstance(found, _ExcludedModule)  # an exclusion is truthy
        assert lora._targeted(spec, name) == peft_says, name


PATTERN_KEYS = [
    "q_proj", "proj", "_proj", "o_proj", "self_attn.q_proj", "layers.1.self_attn.q_proj",
    r"layers\.1\..*", r"language_model.*o_proj", r".*tower.*", "tower", r"(q|k)_proj",
    "language_model.layers.1.mlp.down_proj", r"language_model\.layers\.[23]\.self_attn\.q_proj",
]  # fmt: skip


def test_rank_and_alpha_patterns_follow_peft() -> None:
    """Each single key, and every key order of a few pattern dicts: the first key PEFT's
    get_pattern_key picks decides, or the default when it picks none."""
    import itertools

    from peft.utils.other import get_pattern_key

    dicts = [[key] for key in PATTERN_KEYS] + [
        list(keys) for keys in itertools.permutations(["proj", "q_proj", r"layers\.1\..*"])
    ]
    for keys in dicts:
        patterns = {key: position for position, key in enumerate(keys)}
        for name in MODULE_NAMES:
            picked = get_pattern_key(keys, name)
            expected = patterns.get(picked, -1)
            assert lora._pattern_value(patterns, name, -1) == expected, (keys, name)
