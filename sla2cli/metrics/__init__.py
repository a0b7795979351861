"""Image quality: FID and IS through torch-fidelity, paired comparisons, and the sample folders they read.

- `inception`: torch-fidelity's InceptionV3, its weights found offline (or downloaded once), features.
- `fid`: references (image folder, torch-fidelity input, .npz of mu/sigma), statistics, FID, IS.
- `paired`: PSNR and MAE between two sample sets made from the same (seed, index) noise and labels.
- `samples`: `{index:06d}.png` folders with a manifest; atomic writes; resume.
- `generate`: sampling a folder, sharded over `torchrun` ranks.
- `evaluate`: all of it as `sla2 eval-fid` runs it.
"""

from .evaluate import EvalRequest, evaluate
from .fid import Reference, frechet_distance, inception_score, load_statistics, resolve_reference, statistics
from .generate import Generation, generate_samples
from .inception import cached_weights_path, create_extractor, dataset_features, resolve_weights
from .paired import paired_metrics

__all__ = ["EvalRequest", "Generation", "Reference", "cached_weights_path", "create_extractor", "dataset_features",
           "evaluate", "frechet_distance", "generate_samples", "inception_score", "load_statistics",
           "paired_metrics", "resolve_reference", "resolve_weights", "statistics"]
