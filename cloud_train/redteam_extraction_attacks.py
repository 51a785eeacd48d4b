"""The two extraction attacks of ``roadshield redteam extraction``, against any oracle.

An oracle takes uint8 ``N x S x S x 3`` RGB images and returns an ``Answer``: the label the
service showed for each (int class indices, in the victim's class order) and, when the
key's policy gives them, the probabilities (float32 ``[k, C]``). It may answer fewer
images than asked (the last images of a budget) and raises ``AttackStopped`` when it
answers none (budget exhausted, key switched off, wall-clock cap).

- ``knockoff`` (Orekondy et al. 2019, the random strategy): natural crops drawn from the
  attacker's own pool, each queried once; the clone is trained on the answers.
- ``jacobian`` (Papernot et al. 2017, Jacobian-based dataset augmentation): a small set of
  natural crops as seeds; every round trains the clone, then adds, for each point x,
  ``x + lambda_r * sign(d logit_{O(x)} / dx)`` (O(x): the label the service gave x;
  lambda_r = lambda * (-1)^floor(r / tau), the paper's periodic step size), quantised to
  uint8 as the service quantises it, and queries the new points.

Both train the same clone warm (one Adam optimiser for the whole run) after each step of
the query schedule, on soft targets when the answers carry probabilities and one-hot
labels otherwise (label-only keys, or a key PRADA cut to labels), and record the clone's
agreement with the victim and its clean accuracy on held-out natural crops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class AttackStopped(Exception):
    """The oracle answers no more: ``reason`` says why (budget, forbidden, wall clock)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Answer:
    """What the service said about the first ``len(labels)`` images of a request."""

    labels: np.ndarray  # int64 [k], victim class indices as shown (watermark included)
    probs: np.ndarray | None  # float32 [k, C], or None under a label-only answer


Oracle = Callable[[np.ndarray], Answer]


@dataclass(frozen=True)
class CloneRecipe:
    """How the attacker trains its clone: ``arch`` (a registered model), Adam with a
    one-cycle rate peaking at ``lr``, restarted for each fit of ``epochs`` over everything
    collected after each step of the schedule, batches of ``batch``. Every measured point
    is a clone fitted alike, closely enough to reproduce its answers, the watermark's
    wrong labels included (on the quick victim 12 epochs per step reproduced 8 of its 8
    watermark answers, 6 epochs per step 5 of 19)."""

    arch: str
    epochs: int
    lr: float = 3e-3
    batch: int = 64


class Judge:
    """Agreement with the victim and clean accuracy on held-out natural crops.

    images: uint8 N x S x S x 3; victim_labels: the victim's own predictions on them (read
    from the model file, not through the service); true_labels: the classes rendered."""

    def __init__(self, images: np.ndarray, victim_labels: np.ndarray,
                 true_labels: np.ndarray) -> None:
        from cloud_train.tensors import to_tensor

        self.x = to_tensor(images)
        self.victim = np.asarray(victim_labels, dtype=np.int64)
        self.truth = np.asarray(true_labels, dtype=np.int64)

    def predict(self, model: Any) -> np.ndarray:
        import torch

        model.eval()
        with torch.no_grad():
            return np.concatenate([model(self.x[i:i + 256]).argmax(1).numpy()
                                   for i in range(0, len(self.x), 256)])

    def __call__(self, model: Any) -> tuple[float, float]:
        pred = self.predict(model)
        return float((pred == self.victim).mean()), float((pred == self.truth).mean())


class Clone:
    """The attacker's model and everything it was trained on so far."""

    def __init__(self, recipe: CloneRecipe, num_classes: int, seed: int) -> None:
        import torch

        from cloud_train.models import create_model

        torch.manual_seed(seed)
        self.recipe = recipe
        self.num_classes = num_classes
        self.model = create_model(recipe.arch, num_classes)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=recipe.lr)
        self.rng = np.random.default_rng(seed)
        self.images: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.soft = 0  # answers that carried probabilities

    def add(self, images: np.ndarray, answer: Answer) -> None:
        """Keep the answered images (the first ``len(answer.labels)``) and their targets."""
        k = len(answer.labels)
        if answer.probs is not None:
            target = answer.probs.astype(np.float32)
            self.soft += k
        else:
            target = np.eye(self.num_classes, dtype=np.float32)[answer.labels]
        self.images.append(images[:k])
        self.targets.append(target)

    def fit(self) -> None:
        """The recipe's epochs over everything collected, starting from the current
        weights."""
        import torch
        import torch.nn.functional as F

        from cloud_train.tensors import to_tensor

        if not self.images:
            return
        x = to_tensor(np.concatenate(self.images))
        t = torch.from_numpy(np.concatenate(self.targets))
        n, batch, epochs = len(x), self.recipe.batch, self.recipe.epochs
        steps = epochs * -(-n // batch)
        # a warm restart: the rate falls from lr to 0 along a cosine over this fit's steps
        sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=self.recipe.lr, total_steps=steps, pct_start=0.15,
            anneal_strategy="cos", cycle_momentum=False)
        self.model.train()
        for _ in range(epochs):
            order = torch.from_numpy(self.rng.permutation(n))
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                if len(idx) >= 2:  # batch norm needs two samples
                    loss = -(t[idx] * F.log_softmax(self.model(x[idx]), dim=1)).sum(1).mean()
                    self.opt.zero_grad()
                    loss.backward()
                    self.opt.step()
                sched.step()
        self.model.eval()

    def labels_of(self) -> np.ndarray:
        """The label each kept image was given (argmax of its target)."""
        return np.asarray(np.concatenate(self.targets).argmax(1), dtype=np.int64)


@dataclass
class Curve:
    """Agreement and clean accuracy of the clone against the queries answered so far."""

    points: list[dict[str, float]]
    stopped: str = ""  # why the oracle stopped answering, "" when the plan was spent

    def record(self, queries: int, judge: Judge, clone: Clone) -> None:
        """Measure the clone at ``queries``; a point at the same count is replaced."""
        agreement, accuracy = judge(clone.model)
        if self.points and self.points[-1]["queries"] == queries:
            self.points.pop()
        self.points.append({"queries": int(queries), "agreement": round(agreement, 4),
                            "accuracy": round(accuracy, 4)})


def schedule(first: int, last: int) -> list[int]:
    """Query counts at which the clone is trained and measured: ``first`` doubling up to
    ``last`` (always included)."""
    if first < 1 or last < first:
        from roadshield_base.errors import ConfigError

        raise ConfigError(f"query schedule {first}..{last} is empty",
                          "the first checkpoint must be >= 1 and <= the last")
    steps = []
    q = first
    while q < last:
        steps.append(q)
        q *= 2
    return [*steps, last]


def _collect(clone: Clone, oracle: Oracle, images: np.ndarray, batch: int
             ) -> tuple[int, str]:
    """Query ``images`` in requests of ``batch`` and keep the answers in ``clone``.

    Returns (images answered, why the asking ended early: "" when all were answered)."""
    sent = 0
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        try:
            ans = oracle(chunk)
        except AttackStopped as stop:
            return sent, stop.reason
        clone.add(chunk, ans)
        sent += len(ans.labels)
        if len(ans.labels) < len(chunk):
            return sent, "budget exhausted"
    return sent, ""


def knockoff(oracle: Oracle, pool: np.ndarray, steps: Sequence[int], clone: Clone,
             judge: Judge, batch: int) -> Curve:
    """Query the natural crops of ``pool`` (already shuffled) in order, training and
    measuring the clone at each query count of ``steps``."""
    curve = Curve([])
    sent = 0
    for q in steps:
        want = min(q, len(pool)) - sent
        got, curve.stopped = _collect(clone, oracle, pool[sent:sent + want], batch)
        sent += got
        clone.fit()
        curve.record(sent, judge, clone)
        if curve.stopped or sent >= len(pool):
            break
    return curve


def jacobian_step(clone: Clone, images: np.ndarray, labels: np.ndarray, lam: float
                  ) -> np.ndarray:
    """Papernot et al.'s augmentation of uint8 ``images``: x + lam * sign(d logit_label /
    dx), clipped to [0, 1] and quantised to uint8 (what the service sees)."""
    import torch

    from cloud_train.tensors import to_tensor

    model = clone.model.eval()
    out = []
    for i in range(0, len(images), 256):
        x = to_tensor(images[i:i + 256]).requires_grad_(True)
        y = torch.from_numpy(labels[i:i + 256]).long()
        (grad,) = torch.autograd.grad(model(x).gather(1, y[:, None]).sum(), x)
        step = (x.detach() + lam * grad.sign()).clamp_(0.0, 1.0)
        out.append(np.round(step.permute(0, 2, 3, 1).numpy() * 255.0).astype(np.uint8))
    return np.concatenate(out)


def jacobian(oracle: Oracle, seeds: np.ndarray, budget: int, clone: Clone, judge: Judge,
             batch: int, lam: float, tau: int, rng: np.random.Generator) -> Curve:
    """Jacobian-based dataset augmentation from ``seeds`` up to ``budget`` queries: the
    set doubles each round (the last round takes a random share that fits the plan)."""
    curve = Curve([])
    sent, curve.stopped = _collect(clone, oracle, seeds[:budget], batch)
    rnd = 0
    while True:
        clone.fit()
        curve.record(sent, judge, clone)
        if sent >= budget or curve.stopped:
            break
        new = jacobian_step(clone, np.concatenate(clone.images), clone.labels_of(),
                            lam * (-1.0) ** (rnd // tau))
        room = budget - sent
        if len(new) > room:
            new = new[np.sort(rng.choice(len(new), room, replace=False))]
        got, curve.stopped = _collect(clone, oracle, new, batch)
        sent += got
        rnd += 1
    return curve


def queries_to(curve: Curve, level: float) -> int | None:
    """The first measured query count whose agreement reached ``level`` (None: never)."""
    return next((int(p["queries"]) for p in curve.points if p["agreement"] >= level), None)
