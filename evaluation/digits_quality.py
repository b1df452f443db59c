"""Class-conditioned quality (the paper's Table 1 in small): `evaluate --class-conditioned`.

The paper measures FID, sFID, IS, precision and recall of DiT with and without RSR in Inception
features. Here the images are 16x16 digits, so the feature space is a small CNN trained on the
digits' training split (1500 images) and tested on the held-out split (297); its test accuracy
is part of the result. Figures, each against the training split's features:

    FD         Fréchet distance of Gaussians fitted to the classifier's penultimate features (64-d)
    sFD        the same on its first convolution's feature maps pooled to 4x4 (spatial, like sFID)
    IS         exp E[KL(p(y|x) || p(y))] of the classifier's predictions (10 is the maximum)
    precision  share of samples inside the real features' k-NN manifold (k=3; Kynkäänniemi et al.)
    recall     share of real images inside the samples' k-NN manifold
    class acc  share of samples the classifier assigns to the label they were sampled for

Rows, all from the `dit-digits` preset with the same total number of optimizer steps:

    DiT                 the base stage alone, B steps
    DiT (B+R steps)     the base stage trained B+R steps: DiT without RSR at the same budget
    DiT + RSR           the B-step base, then the RSR stage (mode rsr) for R steps

The real test split (297 images) scored the same way is a reference, not a floor: FD is biased
upward on small sets.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .table import base_tag, train_checkpoint

PRESET = "dit-digits"
SIZE = 16
K_NEIGHBOURS = 3


@dataclass(frozen=True)
class DigitsBudget:
    base_steps: int
    rsr_steps: int
    samples_per_class: int
    sample_steps: int = 20
    guidance: float = 1.5  # DiT's FID setting
    batch_size: int | None = None
    classifier_epochs: int = 30
    seeds: tuple[int, ...] = (0,)  # training seed of the RSR stage (and of both bases)


DEFAULT = DigitsBudget(base_steps=1500, rsr_steps=400, samples_per_class=100)
QUICK = DigitsBudget(base_steps=2, rsr_steps=2, samples_per_class=4, sample_steps=2, batch_size=4,
                     classifier_epochs=1)


# --- the feature network ----------------------------------------------------------------------

class DigitsClassifier(nn.Module):
    """A small CNN for 16x16 digits in [-1, 1]; `features` gives the spaces the figures use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.out = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(spatial (B, 256): conv1 maps pooled to 4x4, penultimate (B, 64), logits (B, 10))."""
        early = self.conv1(x)
        pooled = self.head(self.conv2(early))
        spatial = nn.functional.adaptive_avg_pool2d(early, 4).flatten(1)
        return spatial, pooled, self.out(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[2]


def train_classifier(epochs: int, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """The classifier trained on the training split; returns it (eval mode) and its test accuracy."""
    from rsr_model.data import digits

    torch.manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = (torch.from_numpy(np.array(a)) for a in digits.load_digits_images(SIZE, 1, "train"))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            shifted = torch.roll(x[idx], shifts=tuple(torch.randint(-1, 2, (2,), generator=gen).tolist()), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(shifted), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xt, yt = (torch.from_numpy(np.array(a)) for a in digits.load_digits_images(SIZE, 1, "test"))
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    return model, accuracy


def load_or_train_classifier(path: Path, epochs: int) -> tuple[DigitsClassifier, float]:
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if saved.get("epochs") == epochs:
            model = DigitsClassifier()
            model.load_state_dict(saved["state"])
            return model.eval(), float(saved["test_accuracy"])
    model, accuracy = train_classifier(epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "test_accuracy": accuracy, "epochs": epochs}, path)
    return model, accuracy


# --- figures ----------------------------------------------------------------------------------

def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of Gaussians fitted to rows of a and b."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(root).all():  # near-singular product: regularise, as the reference FID code does
        eps = 1e-6 * np.eye(len(mu_a))
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls."""
    from scipy.spatial.distance import cdist

    def covered(points: np.ndarray, support: np.ndarray) -> float:
        radii = np.sort(cdist(support, support), axis=1)[:, k]  # column 0 is the point itself
        return float((cdist(points, support) <= radii[None]).any(1).mean())
    return covered(fake, real), covered(real, fake)


def inception_score(probs: np.ndarray) -> float:
    marginal = probs.mean(0, keepdims=True)
    kl = (probs * (np.log(probs + 1e-12) - np.log(marginal + 1e-12))).sum(1)
    return float(np.exp(kl.mean()))


@torch.no_grad()
def quality(classifier: DigitsClassifier, images: torch.Tensor, labels: np.ndarray,
            reference: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Every figure of `images` (B, 1, 16, 16) in [-1, 1] sampled for `labels`, against the reference features."""
    spatial, pooled, logits = (t.double().numpy() for t in classifier.features(images.float().clamp(-1, 1)))
    probs = torch.from_numpy(logits).softmax(1).numpy()
    precision, recall = precision_recall(reference[1], pooled)
    return {"fd": frechet_distance(reference[1], pooled), "sfd": frechet_distance(reference[0], spatial),
            "is": inception_score(probs), "precision": precision, "recall": recall,
            "class_accuracy": float((probs.argmax(1) == labels).mean())}


# --- rows -------------------------------------------------------------------------------------

def _train_digits(out: Path, name: str, stage_argv: list[str], plan: dict[str, int], seed: int,
                  budget: DigitsBudget, base: str | None = None) -> tuple[Path, float]:
    """Train one checkpoint of the table, or reuse a finished one trained with the same plan, seed
    and (RSR stage) base: the base is named by its content in the file name (`base_tag`) and by its
    path in the checkpoint's arguments, so an RSR stage trained on another base is never reused."""
    path = out / "checkpoints" / f"{name}.pt"
    batch = ["--batch-size", str(budget.batch_size)] if budget.batch_size else []
    argv = ["--preset", PRESET, *stage_argv, "--seed", str(seed), "--save-every", str(max(plan.values())), *batch]
    expect_args = {"seed": seed, **({"base": base} if base is not None else {})}
    return path, train_checkpoint(path, argv, {"plan": plan, "args": expect_args})


@torch.no_grad()
def sample_digits(ckpt: Path, labels: np.ndarray, budget: DigitsBudget, batch: int = 200) -> torch.Tensor:
    from rsr_model.sample import generate, load_model

    task, transformer, _, _ = load_model(ckpt)
    chunks = [generate(task, transformer, labels[s:s + batch].tolist(), list(range(s, min(s + batch, len(labels)))),
                       steps=budget.sample_steps, guidance=budget.guidance) for s in range(0, len(labels), batch)]
    return torch.cat(chunks)


def run_class_conditioned(out: Path, budget: DigitsBudget, base: Path | None = None,
                          progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], str]:
    from rsr_model.data import digits

    started = time.perf_counter()
    say = progress or (lambda _: None)
    say("feature classifier")
    classifier, test_accuracy = load_or_train_classifier(out / "digits_classifier.pt", budget.classifier_epochs)
    with torch.no_grad():
        train_x = torch.from_numpy(np.array(digits.load_digits_images(SIZE, 1, "train")[0]))
        reference = tuple(t.double().numpy() for t in classifier.features(train_x)[:2])
    labels = np.repeat(np.arange(10), budget.samples_per_class)
    rows: dict[str, dict[str, Any]] = {}
    test_x, test_y = digits.load_digits_images(SIZE, 1, "test")
    rows["real test split"] = quality(classifier, torch.from_numpy(np.array(test_x)), np.asarray(test_y), reference)
    total = budget.base_steps + budget.rsr_steps
    for seed in budget.seeds:
        say(f"seed {seed}: base, {budget.base_steps} steps")
        short, base_s = (base, 0.0) if base is not None else _train_digits(
            out, f"digits_base_{budget.base_steps}_s{seed}", ["--stage", "base", "--steps", str(budget.base_steps)],
            {"base": budget.base_steps}, seed, budget)
        say(f"seed {seed}: base, {total} steps (DiT without RSR at the same budget)")
        long, long_s = _train_digits(out, f"digits_base_{total}_s{seed}", ["--stage", "base", "--steps", str(total)],
                                     {"base": total}, seed, budget)
        say(f"seed {seed}: RSR stage, {budget.rsr_steps} steps")
        rsr, rsr_s = _train_digits(out, f"digits_rsr_s{seed}_{base_tag(short)}",
                                   ["--stage", "rsr", "--base", str(short), "--mode", "rsr", "--steps",
                                    str(budget.rsr_steps)], {"rsr": budget.rsr_steps}, seed, budget,
                                   base=str(short))
        for name, ckpt, seconds in ((f"DiT ({budget.base_steps} steps)", short, base_s),
                                    (f"DiT ({total} steps)", long, long_s),
                                    (f"DiT + RSR ({budget.base_steps} + {budget.rsr_steps})", rsr, base_s + rsr_s)):
            say(f"seed {seed}: sampling {name}")
            figures = quality(classifier, sample_digits(ckpt, labels, budget), labels, reference)
            rows.setdefault(name, {"runs": []})["runs"].append({"seed": seed, **figures, "train_s": seconds})
    for name, row in rows.items():
        if "runs" in row:
            row.update({k: float(np.mean([r[k] for r in row["runs"]])) for k in FIGURES})
            row["std"] = {k: float(np.std([r[k] for r in row["runs"]], ddof=1)) if len(row["runs"]) > 1 else None
                          for k in FIGURES}
    result = {"budget": asdict(budget), "classifier_test_accuracy": test_accuracy, "samples": int(labels.size),
              "rows": rows, "seconds": time.perf_counter() - started}
    return result, markdown(result)


FIGURES = {"fd": "FD ↓", "sfd": "sFD ↓", "is": "IS ↑", "precision": "Precision ↑", "recall": "Recall ↑",
           "class_accuracy": "Class acc ↑"}


def markdown(result: dict[str, Any]) -> str:
    from .markdown import table_lines

    def cell(row: dict[str, Any], k: str) -> str:
        std = (row.get("std") or {}).get(k)
        return f"{row[k]:.3f}" if std is None else f"{row[k]:.3f} ± {std:.3f}"

    rows = [[name, *(cell(row, k) for k in FIGURES)] for name, row in result["rows"].items()]
    b = result["budget"]
    note = (f"{result['samples']} samples ({b['samples_per_class']} per class), {b['sample_steps']} sampler steps, "
            f"guidance {b['guidance']}; features of a digits CNN with test accuracy "
            f"{100 * result['classifier_test_accuracy']:.1f}% (297 held-out images). Training seeds "
            f"{list(b['seeds'])} (mean ± std over seeds where there are several). Wall time {result['seconds']:.0f} s.")
    return "\n".join([*table_lines(["Model", *FIGURES.values()], rows), "", note])
