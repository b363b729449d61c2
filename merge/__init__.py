"""The parts of merge_adapter.py, one job a module; merge_adapter.py is the command that runs them.

errors          MergeError, the one exception a refused merge raises
limits          how much memory the streaming copies and merges may hold at a time
safetensors_io  safetensors headers, a base's shards and index, reading and writing tensors
layout          output tensor names and config.json of the full and the text-only layout
lora            the adapter: its config read and checked, its pairs, the merge arithmetic
nf4             the NF4 round trip of --base-weights nf4 (bitsandbytes' QLoRA storage)
write           one output shard, streamed tensor by tensor
output          the output directory: checked, staged beside itself, swapped in
scales          each module's LoRA scale, derived apart from lora.py (for --verify)
verify          --verify: the weights by WEIGHT_RULE, then the logits
logits          --verify's second half: merged vs base-plus-unmerged-adapter logits
"""
