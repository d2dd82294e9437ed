"""setuptools entry point; the metadata lives in pyproject.toml.

Also builds the C++ CPU kernels csrc/sqdf_cpu.cpp into sqdf_fast/_sqdf_cpu*.so: the CPython extension module
sqdf_fast._sqdf_cpu (plain C++ and the Python C API, no torch headers, so pip's isolated build environment needs no
torch) that sqdf_fast/ops/cpp.py imports. A missing compiler or a failed build only warns, and the package runs on
the torch reference.
"""
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

HERE = Path(__file__).parent.resolve()
FAILED_NOTE = "_sqdf_cpu.build-failed.txt"  # the failure reason, shown by sqdf_fast.ops.cpp.unavailable_reason()
# -ffp-contract=off: no fused multiply-adds, so each element's rounding follows the source expression, the same in
# every kernel variant (the loops are memory-bound: FMAs would not make them faster). -fno-trapping-math lets gcc
# evaluate both sides of the float16 conversion's selects, which it needs to vectorise them (we never read the
# floating-point exception flags); it does not change any result.
BASE_FLAGS = ["-std=c++17", "-O3", "-ffp-contract=off", "-fno-trapping-math"]
# (compile, link) flags, best first; the first set the compiler accepts builds the library. -march=native: the
# library is built on the machine that runs it (AVX-512/AVX2 conversions make the 16-bit dtypes several times
# faster); -fopenmp-simd keeps the vectorised reductions when no OpenMP runtime is installed.
FLAG_SETS = [
    (["-march=native", "-fopenmp"], ["-fopenmp"]),
    (["-fopenmp"], ["-fopenmp"]),
    (["-fopenmp-simd"], []),
]
BUILD_ERRORS = (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError)


class OptionalBuildExt(build_ext):
    """build_ext that picks the best accepted flags and turns a failed build into a warning."""

    def build_extension(self, ext: Extension) -> None:
        library = Path(self.get_ext_fullpath(ext.name))
        notes, stale = [library.with_name(FAILED_NOTE)], []
        if self.editable_mode:  # the library is copied into the source tree afterwards; the note goes there too
            notes.append(HERE / "sqdf_fast" / FAILED_NOTE)
            stale.append(HERE / "sqdf_fast" / library.name)
        compile_flags, link_flags = next(((c, l) for c, l in FLAG_SETS if self._accepts(c, l)), ([], []))
        flags = BASE_FLAGS + compile_flags
        ext.extra_compile_args, ext.extra_link_args = flags, link_flags
        ext.define_macros = [("SQDF_BUILD_FLAGS", '"' + " ".join(flags) + '"')]
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as err:
            reason = f"the C++ build failed at install time ({err}); reinstall with `pip install -v` to see why"
            print(f"\nWARNING: sqdf_fast: {reason}. The C++ CPU kernels are disabled; the torch reference runs "
                  f"instead.\n", file=sys.stderr)
            for note in notes:
                note.parent.mkdir(parents=True, exist_ok=True)
                note.write_text(reason + "\n")
            for path in stale:  # a library from older sources must not outlive a failed rebuild
                path.unlink(missing_ok=True)
            return
        for note in notes:
            note.unlink(missing_ok=True)

    def _accepts(self, compile_flags: list[str], link_flags: list[str]) -> bool:
        """Whether the compiler builds and links a trivial shared library with these flags."""
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp, "probe.cpp")
            source.write_text("int sqdf_probe() { return 0; }\n")
            try:
                objects = self.compiler.compile([str(source)], output_dir=tmp,
                                                extra_postargs=BASE_FLAGS + compile_flags)
                self.compiler.link_shared_object(objects, str(Path(tmp, "probe.so")), extra_postargs=link_flags,
                                                 target_lang="c++")
            except BUILD_ERRORS:
                return False
        return True


setup(
    ext_modules=[Extension("sqdf_fast._sqdf_cpu", ["csrc/sqdf_cpu.cpp"], language="c++", optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
