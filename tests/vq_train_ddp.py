"""Run by torchrun in test_tokenizer_train: train a few steps on every rank (GAN on), then
write this rank's codebook and weights digests to OUT/rank<R>.json."""
import hashlib
import json
import sys
from pathlib import Path

import torch

from cogalign.tokenizers.training import train_vq
from cogalign.tokenizers.training.loop import codebooks_equal_across_ranks

images, out = sys.argv[1], Path(sys.argv[2])
m = train_vq([images], out, log=None, progress=False, codes=32, ch_mult=(1, 1, 1, 1), steps=3, batch_size=1,
             crop=32, disc_weight=0.5, disc_start=1, kmeans_latents=64, save_every=100)
model = m["model"]


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


rank = torch.distributed.get_rank()
(out / f"rank{rank}.json").write_text(json.dumps({
    "codebook": digest([model.codebook]),
    "weights": digest([v for k, v in sorted(model.state_dict().items()) if not k.startswith("vq.")]),
    "equal": codebooks_equal_across_ranks(model), "world": m["world_size"],
    "codes_used": m["history"]["codes_used"]}))
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # a clean gloo shutdown: exiting with it alive aborted rank 0 at times
