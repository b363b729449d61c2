"""The seed's inference path as a user of the model card would run it: transformers + the PEFT
adapter (unmerged), ``generate``, one request at a time, greedy, ``max_new_tokens=1024``.

    python benchmarks/seed_baseline.py --base google/gemma-4-E4B-it \
        --adapter Shubh-0789/gemma4-clinical-endpoint-extractor --requests 16 --out seed.json

Reports output tokens/s, extractions/s (answers that parse and validate as EndpointExtraction) and
tokens per extraction, for comparison with ``throughput.py`` against vLLM on the same model and
hardware. Differences from the card, all in the seed's favour: bf16 weights instead of 4-bit
bitsandbytes (faster per token on a GPU), and the prompt is tokenized once per request.

``--outlines`` constrains generation to the endpoint schema with outlines, the seed's optional
structured path. ``--random-base`` builds the base from its config.json with random weights and
``--adapter random`` attaches a random LoRA of the card's shape (r=16, alpha=16, seven projections),
for machines that cannot download the real ones; random weights never stop writing, so add
``--steer pretty`` to make them write the gold answers as the fine-tuned model does (the card's
pretty-printed JSON), see steer.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.steer import HFSteer  # noqa: E402
from benchmarks.workload import CORPUS, GOLD, STYLES, load  # noqa: E402
from client.models import EndpointExtraction  # noqa: E402
from client.prompt import build_messages  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CARD_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def patch_clippable_linear() -> None:
    """The model card's monkey-patch: PEFT cannot wrap Gemma4ClippableLinear, so it is replaced by
    a plain nn.Linear subclass before the model is built (verbatim in behaviour)."""
    from torch import nn
    from transformers.models.gemma4 import modeling_gemma4

    class PatchedClippableLinear(nn.Linear):
        def __init__(self, config, in_features, out_features):  # type: ignore[no-untyped-def]
            nn.Linear.__init__(self, in_features, out_features, bias=False)
            self.use_clipped_linears = getattr(config, "use_clipped_linears", False)
            if self.use_clipped_linears:
                self.register_buffer("input_min", torch.tensor(-float("inf")))
                self.register_buffer("input_max", torch.tensor(float("inf")))
                self.register_buffer("output_min", torch.tensor(-float("inf")))
                self.register_buffer("output_max", torch.tensor(float("inf")))

        def forward(self, x):  # type: ignore[no-untyped-def]
            if self.use_clipped_linears:
                x = torch.clamp(x, self.input_min, self.input_max)
            out = nn.Linear.forward(self, x)
            if self.use_clipped_linears:
                out = torch.clamp(out, self.output_min, self.output_max)
            return out

    modeling_gemma4.Gemma4ClippableLinear = PatchedClippableLinear


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    patch_clippable_linear()
    dtype = DTYPES[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    if args.random_base:
        config = AutoConfig.from_pretrained(args.base)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype).to(args.device)
    if args.adapter == "random":
        lora = LoraConfig(
            r=16, lora_alpha=16, lora_dropout=0.0, target_modules=CARD_TARGETS, init_lora_weights=False
        )
        model = get_peft_model(model, lora)
    else:
        model = PeftModel.from_pretrained(model, args.adapter)
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base model directory or hub id")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory or hub id, or 'random'")
    p.add_argument("--random-base", action="store_true", help="random weights from the base's config.json")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=1024, help="the card's value")
    p.add_argument("--outlines", action="store_true", help="constrain to the schema with outlines")
    p.add_argument("--steer", choices=["none", *STYLES], default="none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE to record")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.requests < 1 or args.max_new_tokens < 1:
        p.error("--requests and --max-new-tokens must be positive")
    if args.steer != "none" and args.outlines:
        p.error("--steer and --outlines do not combine")

    model, tokenizer = load_model(args)
    items = load(GOLD if args.steer != "none" else CORPUS)
    constrained = None
    if args.outlines:
        import outlines

        constrained = outlines.from_transformers(model, tokenizer)

    def one(index: int) -> dict[str, Any]:
        item = items[index % len(items)]
        prompt = tokenizer.apply_chat_template(
            build_messages(item.text), tokenize=False, add_generation_prompt=True
        )
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        if constrained is not None:
            text = constrained(
                prompt, EndpointExtraction, max_new_tokens=args.max_new_tokens, do_sample=False
            )
            tokens = len(tokenizer.encode(text, add_special_tokens=False))
        else:
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(args.device)
            prompt_len = inputs["input_ids"].shape[1]
            extra: dict[str, Any] = {}
            if args.steer != "none":
                assert item.expected is not None
                target = tokenizer.encode(STYLES[args.steer](item.expected), add_special_tokens=False)
                extra["logits_processor"] = [HFSteer(target, prompt_len, int(tokenizer.eos_token_id))]
            with torch.no_grad():
                output = model.generate(
                    **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, **extra
                )
            new = output[0][prompt_len:]
            tokens = int(new.shape[0])
            text = tokenizer.decode(new, skip_special_tokens=True)
        sync()
        latency = time.perf_counter() - start
        try:
            EndpointExtraction.model_validate_json(text)
            valid = True
        except ValueError:
            valid = False
        return {"id": item.id, "tokens": tokens, "latency_s": latency, "valid": valid}

    for i in range(args.warmup):
        one(i)
    rows = [one(args.warmup + i) for i in range(args.requests)]
    wall = sum(r["latency_s"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    valid = [r for r in rows if r["valid"]]
    summary = {
        "requests": len(rows),
        "valid": len(valid),
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(rows) / wall, 4),
        "extractions_per_s": round(len(valid) / wall, 4),
        "mean_output_tokens": round(tokens / len(rows), 1),
        "tokens_per_extraction": round(statistics.fmean(r["tokens"] for r in valid), 1) if valid else None,
        "latency_p50_s": round(statistics.median(r["latency_s"] for r in rows), 3),
    }
    print(json.dumps(summary))
    if args.out:
        meta = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__,
            "labels": dict(x.partition("=")[::2] for x in args.label),
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        args.out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
