"""Few-shot Omniglot classification (N-way K-shot) with MAML and loft's differentiable SGD.

The network is the standard four-block convolutional net of the MAML paper: each block is
a 3x3 convolution with 64 channels, BatchNorm, ReLU and 2x2 max-pooling, on 28x28
grayscale images (28 -> 14 -> 7 -> 3 -> 1), followed by a linear layer to the N classes.

A task draws N classes, K support and ``--k-query`` query drawings of each, and labels the
classes 0..N-1 in a random order. For each of the ``--task-num`` tasks of a meta-batch,
``loft.innerloop_ctx(net, sgd, copy_initial_weights=False)`` takes ``--inner-steps`` steps
of SGD (lr ``--inner-lr``) on the support set; the cross-entropy on the query set after
those steps is the meta-loss, whose gradient flows back through every step to the
initial weights, which Adam (lr ``--meta-lr``) updates. BatchNorm stays in training mode
throughout (batch statistics of the support or query set, as in the usual MAML Omniglot
code; the running statistics are never used). Before meta-training and after each epoch
of ``--iterations`` meta-updates it adapts to the same ``--eval-tasks`` tasks of the
held-out classes and prints their mean query loss and accuracy; the last accuracy is the
final figure, followed by the median time per meta-update.

``--batched`` runs each meta-batch as one inner loop instead of one per task:
``loft.innerloop_ctx(net, sgd, copy_initial_weights=False, tasks=N)`` makes every fast
weight and BatchNorm buffer ``[N, *shape]`` (per-task batch statistics, as before),
``fnet`` takes the tasks' images stacked as ``[N, n_way * k, 1, 28, 28]``, and
``diffopt.step`` takes the ``[N]`` per-task losses, so that each task takes its own SGD
step. The held-out evaluation is batched the same way. The figures are the same up to
float rounding (the same seed draws the same tasks).

Data, one of:

``--data PATH``
    The Omniglot dataset, unpacked locally in its standard layout:
    ``PATH/images_background/<alphabet>/<character>/*.png`` (the 964 meta-training
    characters) and ``PATH/images_evaluation/<alphabet>/<character>/*.png`` (the 659
    held-out characters). Images are read with Pillow (``pip install pillow``), inverted
    (ink = 1) and resized to 28x28. Nothing is ever downloaded. ``--rotations`` adds the
    90, 180 and 270 degree rotations of every training character as new classes.
``--synthetic``
    Random data of the same shapes, for trying the example without the dataset: each
    class is a random blocky glyph, and its 20 "drawings" are the glyph shifted by up to
    three pixels with 20% of its pixels flipped, so learning is possible and the loss falls.

Run::

    python examples/maml_omniglot.py --data ~/data/omniglot [--n-way 5] [--k-shot 1]
        [--k-query 15] [--task-num 32] [--inner-steps 5] [--epochs 10]
        [--iterations 100] [--device cpu] [--seed 0] [--batched]
    python examples/maml_omniglot.py --synthetic --epochs 2 --iterations 20 [--batched]

The tasks are small: on a CPU shared with other work, ``OMP_NUM_THREADS=1`` can be much
faster than oversubscribed threads.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: plain iteration without it
    def tqdm(iterable, **_):  # type: ignore[no-redef]
        return iterable

try:  # Pillow decodes the PNGs of --data; --synthetic does not need it
    from PIL import Image
except ImportError:
    Image = None  # type: ignore[assignment]

import loft

IMAGE_SIZE = 28
TRAIN_SPLIT = "images_background"
TEST_SPLIT = "images_evaluation"
#: --synthetic: classes in the meta-training and held-out pools, drawings per class
#: (Omniglot has 20 drawings of each character).
SYNTHETIC_CLASSES = {"train": 100, "test": 50}
SYNTHETIC_DRAWINGS = 20

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- data

def require_pil() -> None:
    """Raise a clear error if Pillow, which decodes Omniglot's PNGs, is missing."""
    if Image is None:
        raise ImportError("reading the Omniglot PNGs of --data needs Pillow, which is not "
                          "installed: pip install pillow (or run with --synthetic)")


def find_characters(split_dir: Path) -> list[Path]:
    """The character folders of one split (``split_dir/<alphabet>/<character>/*.png``),
    in a fixed (sorted) order. Folders without a PNG are skipped."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} is not a directory: --data expects the "
                                f"Omniglot layout PATH/{TRAIN_SPLIT}/<alphabet>/<character>/"
                                f"*.png and PATH/{TEST_SPLIT}/<alphabet>/<character>/*.png")
    characters = [
        character
        for alphabet in sorted(split_dir.iterdir()) if alphabet.is_dir()
        for character in sorted(alphabet.iterdir())
        if character.is_dir() and any(character.glob("*.png"))
    ]
    if not characters:
        raise FileNotFoundError(f"no <alphabet>/<character>/*.png under {split_dir}")
    return characters


def load_image(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """One drawing as a ``(size, size)`` uint8 array, ink 255 on background 0."""
    require_pil()
    resampling = getattr(Image, "Resampling", Image)  # Pillow >= 9.1 / older
    with Image.open(path) as image:
        gray = image.convert("L").resize((size, size), resampling.LANCZOS)
        return 255 - np.asarray(gray, dtype=np.uint8)  # Omniglot draws black on white


def load_split(split_dir: Path, size: int = IMAGE_SIZE) -> list[np.ndarray]:
    """Every character of a split: one ``(drawings, size, size)`` uint8 array each."""
    require_pil()
    characters = find_characters(split_dir)
    return [np.stack([load_image(png, size) for png in sorted(character.glob("*.png"))])
            for character in tqdm(characters, desc=f"reading {split_dir.name}", leave=False)]


def load_omniglot(root: Path, size: int = IMAGE_SIZE) -> dict[str, list[np.ndarray]]:
    """The meta-training (``images_background``) and held-out (``images_evaluation``)
    classes of an Omniglot directory."""
    require_pil()
    return {"train": load_split(root / TRAIN_SPLIT, size),
            "test": load_split(root / TEST_SPLIT, size)}


def with_rotations(classes: list[np.ndarray]) -> list[np.ndarray]:
    """The classes and their 90, 180 and 270 degree rotations, each a class of its own."""
    return [np.rot90(images, k, axes=(1, 2)).copy() for k in range(4) for images in classes]


def synthetic_classes(num_classes: int, drawings: int, rng: np.random.Generator,
                      size: int = IMAGE_SIZE) -> list[np.ndarray]:
    """Random classes of Omniglot's shapes: a blocky glyph per class (a 7x7 random binary
    grid scaled to ``size``), drawn as the glyph shifted by up to 3 pixels in each
    direction with 20% of its pixels flipped."""
    block = size // 7
    classes = []
    for _ in range(num_classes):
        glyph = np.kron(rng.random((7, 7)) < 0.3, np.ones((block, block), dtype=bool))
        images = np.empty((drawings, size, size), dtype=np.uint8)
        for j in range(drawings):
            shifted = np.roll(glyph, tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
            images[j] = 255 * (shifted ^ (rng.random((size, size)) < 0.2))
        classes.append(images)
    return classes


class TaskSampler:
    """Draws N-way K-shot tasks from a pool of classes.

    Each class is a ``(drawings, H, W)`` uint8 array. A task takes ``n_way`` distinct
    classes in a random order (its labels 0..n_way-1) and ``k_shot + k_query`` distinct
    drawings of each.
    """

    def __init__(self, classes: list[np.ndarray], n_way: int, k_shot: int, k_query: int,
                 rng: np.random.Generator) -> None:
        if len(classes) < n_way:
            raise ValueError(f"{n_way}-way tasks need {n_way} classes; there are "
                             f"{len(classes)}")
        fewest = min(len(images) for images in classes)
        if fewest < k_shot + k_query:
            raise ValueError(f"k_shot + k_query = {k_shot + k_query} drawings per class are "
                             f"needed; a class has only {fewest}")
        self.classes, self.rng = classes, rng
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query

    def sample(self, task_num: int, device: torch.device | str = "cpu") -> Batch:
        """``(x_support, y_support, x_query, y_query)`` of ``task_num`` tasks.

        Images are float32 in [0, 1], shaped ``(task_num, n_way * k, 1, H, W)``; labels
        are int64, shaped ``(task_num, n_way * k)``.
        """
        shots = self.k_shot + self.k_query
        height, width = self.classes[0].shape[1:]
        images = np.empty((task_num, self.n_way, shots, height, width), dtype=np.uint8)
        for t in range(task_num):
            for label, c in enumerate(self.rng.choice(len(self.classes), self.n_way,
                                                      replace=False)):
                drawings = self.classes[c]
                images[t, label] = drawings[self.rng.choice(len(drawings), shots,
                                                            replace=False)]
        x = torch.from_numpy(images).float().div_(255.0).unsqueeze(3)  # (T, N, S, 1, H, W)
        y = torch.arange(self.n_way).view(1, self.n_way, 1).expand(task_num, -1, shots)
        k = self.k_shot

        def flat(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.reshape(task_num, -1, *tensor.shape[3:]).to(device)

        return flat(x[:, :, :k]), flat(y[:, :, :k]), flat(x[:, :, k:]), flat(y[:, :, k:])


# --------------------------------------------------------------------------- model

def make_network(n_way: int) -> nn.Sequential:
    """Four blocks of conv 3x3 (64 channels) - BatchNorm - ReLU - max-pool 2x2, then a
    linear classifier: 1x28x28 -> 64x14x14 -> 64x7x7 -> 64x3x3 -> 64x1x1 -> n_way."""
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, 64, kernel_size=3, padding=1),
                   nn.BatchNorm2d(64, momentum=1.0), nn.ReLU(), nn.MaxPool2d(2, 2)]
        channels = 64
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, n_way))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def task_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The ``[N]`` per-task mean cross-entropies of task-batched ``[N, B, n_way]`` logits
    and ``[N, B]`` labels."""
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return losses.view(labels.shape).mean(1)


def meta_train_step(net: nn.Module, inner_opt: torch.optim.Optimizer,
                    meta_opt: torch.optim.Optimizer, batch: Batch,
                    inner_steps: int, batched: bool = False) -> tuple[float, float]:
    """One meta-update on a batch of tasks; returns the mean query loss and accuracy
    after adaptation (``batched``: all tasks in one ``innerloop_ctx(..., tasks=N)``)."""
    x_support, y_support, x_query, y_query = batch
    task_num = x_support.shape[0]
    meta_opt.zero_grad()
    loss_sum = acc_sum = 0.0
    if batched:
        with loft.innerloop_ctx(net, inner_opt, copy_initial_weights=False,
                                tasks=task_num) as (fnet, diffopt):
            for _ in range(inner_steps):
                diffopt.step(task_cross_entropy(fnet(x_support), y_support))
            logits = fnet(x_query)  # [task_num, n_way * k_query, n_way]
            losses = task_cross_entropy(logits, y_query)
            losses.mean().backward()  # the meta-gradient of every task at once
        meta_opt.step()
        return losses.mean().item(), accuracy(logits, y_query)
    for i in range(task_num):
        with loft.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(inner_steps):
                diffopt.step(F.cross_entropy(fnet(x_support[i]), y_support[i]))
            logits = fnet(x_query[i])
            loss = F.cross_entropy(logits, y_query[i])
            # The meta-gradient of this task, through every inner step, accumulates in
            # net's parameters' .grad; the graph of the task is freed here.
            (loss / task_num).backward()
        loss_sum += loss.item()
        acc_sum += accuracy(logits, y_query[i])
    meta_opt.step()
    return loss_sum / task_num, acc_sum / task_num


def evaluate(net: nn.Module, inner_opt: torch.optim.Optimizer, batch: Batch,
             inner_steps: int, batched: bool = False) -> tuple[float, float]:
    """Mean query loss and accuracy over a batch of tasks after adapting to each one
    (``batched``: to all at once); ``net``'s weights are unchanged."""
    x_support, y_support, x_query, y_query = batch
    task_num = x_support.shape[0]
    loss_sum = acc_sum = 0.0
    if batched:
        with loft.innerloop_ctx(net, inner_opt, copy_initial_weights=False,
                                track_higher_grads=False,
                                tasks=task_num) as (fnet, diffopt):
            for _ in range(inner_steps):
                diffopt.step(task_cross_entropy(fnet(x_support), y_support))
            with torch.no_grad():
                logits = fnet(x_query)
                return (task_cross_entropy(logits, y_query).mean().item(),
                        accuracy(logits, y_query))
    for i in range(task_num):
        with loft.innerloop_ctx(net, inner_opt, copy_initial_weights=False,
                                track_higher_grads=False) as (fnet, diffopt):
            for _ in range(inner_steps):
                diffopt.step(F.cross_entropy(fnet(x_support[i]), y_support[i]))
            with torch.no_grad():
                logits = fnet(x_query[i])
                loss_sum += F.cross_entropy(logits, y_query[i]).item()
                acc_sum += accuracy(logits, y_query[i])
    return loss_sum / task_num, acc_sum / task_num


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, metavar="PATH",
                        help="Omniglot root holding images_background/ and images_evaluation/")
    source.add_argument("--synthetic", action="store_true",
                        help="random data of Omniglot's shapes instead of the dataset")
    parser.add_argument("--rotations", action="store_true",
                        help="add rotated training characters as new classes")
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--k-query", type=int, default=15)
    parser.add_argument("--task-num", type=int, default=32, help="tasks per meta-update")
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--meta-lr", type=float, default=0.001)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=100,
                        help="meta-updates per epoch")
    parser.add_argument("--eval-tasks", type=int, default=100,
                        help="held-out tasks evaluated before training and after each epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batched", action="store_true",
                        help="run each meta-batch as one innerloop_ctx(..., tasks=N)")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    print(f"loft backend: {loft.backend()} ({loft.backend_reason()})")

    if args.synthetic:
        pools = {split: synthetic_classes(count, SYNTHETIC_DRAWINGS, rng)
                 for split, count in SYNTHETIC_CLASSES.items()}
    else:
        try:
            pools = load_omniglot(args.data.expanduser())
        except (ImportError, FileNotFoundError) as error:
            parser.error(str(error))
    if args.rotations:
        pools["train"] = with_rotations(pools["train"])
    print(f"data: {'synthetic' if args.synthetic else args.data}, "
          f"{len(pools['train'])} training classes, {len(pools['test'])} held-out classes")
    try:
        train_tasks = TaskSampler(pools["train"], args.n_way, args.k_shot, args.k_query, rng)
        TaskSampler(pools["test"], args.n_way, args.k_shot, args.k_query, rng)
    except ValueError as error:
        parser.error(str(error))

    net = make_network(args.n_way).to(device)
    net.train()  # BatchNorm uses batch statistics, in the inner loop and at evaluation
    inner_opt = torch.optim.SGD(net.parameters(), lr=args.inner_lr)
    meta_opt = torch.optim.Adam(net.parameters(), lr=args.meta_lr)

    def evaluate_held_out() -> tuple[float, float]:
        # The same held-out tasks every time (a generator of their own), so that the
        # figures before training and after each epoch are comparable.
        sampler = TaskSampler(pools["test"], args.n_way, args.k_shot, args.k_query,
                              np.random.default_rng(args.seed + 1_000_003))
        return evaluate(net, inner_opt, sampler.sample(args.eval_tasks, device),
                        args.inner_steps, args.batched)

    test_loss, test_acc = evaluate_held_out()
    print(f"before meta-training: held-out query loss {test_loss:.4f} acc {test_acc:.4f}")
    seconds = []
    for epoch in range(1, args.epochs + 1):
        bar = tqdm(range(args.iterations), desc=f"epoch {epoch}/{args.epochs}")
        train_loss = train_acc = float("nan")
        for _ in bar:
            batch = train_tasks.sample(args.task_num, device)
            start = time.perf_counter()
            train_loss, train_acc = meta_train_step(net, inner_opt, meta_opt, batch,
                                                    args.inner_steps, args.batched)
            seconds.append(time.perf_counter() - start)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(query_loss=f"{train_loss:.3f}", query_acc=f"{train_acc:.3f}")
        test_loss, test_acc = evaluate_held_out()
        print(f"epoch {epoch}: train query loss {train_loss:.4f} acc {train_acc:.4f} | "
              f"held-out query loss {test_loss:.4f} acc {test_acc:.4f}")
    print(f"held-out query accuracy after adaptation: {test_acc:.4f} ({args.n_way}-way "
          f"{args.k_shot}-shot, inner steps: {args.inner_steps}, chance: {1 / args.n_way:.4f})")
    if seconds:
        mode = f"batched, tasks={args.task_num}" if args.batched else "one task at a time"
        print(f"time per meta-iteration: {1e3 * statistics.median(seconds):.2f} ms (median; "
              f"{mode})")


if __name__ == "__main__":
    main()
