"""Packaging for loft: pure Python, with the C++/CUDA sources shipped as package data.

Nothing is compiled here. ``csrc/`` is copied into the wheel as ``loft/csrc/`` and
``loft/_ext.py`` JIT-compiles it at first use (``torch.utils.cpp_extension.load``). The
build therefore never needs torch, so pip's isolated build env stays small and pip never
downloads a second (CUDA) torch. ``CMakeLists.txt`` builds the same sources for C++
tooling and AOT builds; it is not on this path.
"""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# What the JIT build and CMakeLists.txt can read: sources and headers, never build outputs.
CSRC_SUFFIXES = {".cpp", ".cc", ".h", ".hpp", ".cu", ".cuh"}


def csrc_files() -> list[Path]:
    """Every C++/CUDA source and header under csrc/, relative to the repository root."""
    return sorted(
        path.relative_to(ROOT)
        for path in CSRC.rglob("*")
        if path.is_file()
        and path.suffix in CSRC_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(CSRC).parts)
    )


class build_py_with_csrc(build_py):
    """Copies csrc/ to <build_lib>/loft/csrc/, where the installed loft/_ext.py looks.

    An editable install skips the copy: there loft/_ext.py finds <repo>/csrc directly.
    """

    def _csrc_destination(self) -> Path:
        return Path(self.build_lib) / "loft" / "csrc"

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        destination = self._csrc_destination()
        # Start from empty so a source deleted or renamed in csrc/ cannot linger in a
        # reused build/ dir and be JIT-compiled (a duplicate op registration) later.
        shutil.rmtree(destination, ignore_errors=True)
        for relative in csrc_files():
            target = destination / relative.relative_to("csrc")
            self.mkpath(str(target.parent))
            self.copy_file(str(ROOT / relative), str(target), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        destination = self._csrc_destination()
        return outputs + [str(destination / p.relative_to("csrc")) for p in csrc_files()]

    def get_source_files(self) -> list[str]:
        # sdist collects its Python-side files from here: this puts csrc/ in the sdist.
        return super().get_source_files() + [str(p) for p in csrc_files()]


# What `python -m loft.bench` imports beyond loft's own requirements: higher, the baseline
# every ratio is taken against (0.2.1, the release the README's figures compare with),
# torchopt, a peer (its wheel needs only torch>=1.13, optree, numpy, graphviz: pip keeps the
# installed torch; its compiled op is built for one torch release and the benchmark records
# whether it loads), and matplotlib for the plot. The benchmark checks for higher and
# matplotlib before it measures anything, and leaves torchopt out with a note when missing.
BENCH_REQUIRES = ["higher==0.2.1", "torchopt>=0.7.3", "matplotlib"]
# pillow: the Omniglot loader test writes and reads real PNGs; the bench extra: the parity
# tests against higher and the benchmark's own tests (plot included).
TEST_REQUIRES = ["pytest", "pytest-benchmark", "numpy", "hypothesis", "pillow", *BENCH_REQUIRES]

setup(
    name="loft",
    version="0.1.0",
    description=(
        "Differentiable inner-loop optimisation for PyTorch (higher's API) "
        "with fused, JIT-compiled optimiser kernels"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8")
    if (ROOT / "README.md").is_file()
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    package_dir={"": "python"},
    packages=find_packages(where="python", include=["loft", "loft.*"]),
    package_data={"loft": ["py.typed"]},
    include_package_data=False,
    zip_safe=False,  # the JIT build reads loft/csrc/ from the file system
    # torch>=2.1 is met by an installed torch 2.13.0, so pip keeps it (no download).
    install_requires=["torch>=2.1", "numpy", "ninja", "filelock", "tqdm"],
    extras_require={
        "bench": BENCH_REQUIRES,
        "test": TEST_REQUIRES,
        "dev": [*TEST_REQUIRES, "ruff", "clang-format"],
    },
    cmdclass={"build_py": build_py_with_csrc},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Typing :: Typed",
    ],
)
