"""Image quality: FID and IS through torch-fidelity, paired comparisons, and the sample folders they read.

- `features`: the feature spaces (torch-fidelity's Inception-V3; the shipped texture network), one registry.
- `inception`: torch-fidelity's InceptionV3 weights, found offline (or downloaded once).
- `texture_features`: the texture network, registered with torch-fidelity as a feature extractor.
- `fid`: references (image folder, torch-fidelity input, .npz of mu/sigma), statistics, FID, KID, IS.
- `paired`: PSNR, SSIM and MAE between two sample sets made from the same (seed, index) noise and labels.
- `grid`: sample grids as PNG.
- `samples`: `{index:06d}.png` folders with a manifest; atomic writes; resume.
- `generate`: sampling a folder, sharded over `torchrun` ranks.
- `evaluate`: all of it as `sla2 eval-fid` runs it.
"""

from .evaluate import EvalRequest, evaluate
from .features import FEATURE_SPACES, FeatureSpace, create_extractor, dataset_features, feature_space
from .fid import (
    Reference,
    frechet_distance,
    inception_score,
    kernel_distance,
    load_statistics,
    resolve_reference,
    statistics,
)
from .generate import Generation, generate_samples
from .inception import cached_weights_path, resolve_weights
from .paired import compare_pairs, paired_metrics

__all__ = ["FEATURE_SPACES", "EvalRequest", "FeatureSpace", "Generation", "Reference", "cached_weights_path",
           "compare_pairs", "create_extractor", "dataset_features", "evaluate", "feature_space", "frechet_distance",
           "generate_samples", "inception_score", "kernel_distance", "load_statistics", "paired_metrics",
           "resolve_reference", "resolve_weights", "statistics"]
