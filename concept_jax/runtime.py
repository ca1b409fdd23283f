"""Process settings made once, before any work, by the command-line entry points (main, bench).

Both change speed only, never a result:
- glibc's allocator thresholds. Every CPU train step frees and allocates again a few MiB of
  temporaries. By default glibc serves the larger ones with fresh mmaps and hands freed memory at the
  top of its heaps back to the system, so each step pays a page fault for every page of its
  temporaries: on the negative-transfer benchmark's ResNet-10 that was half of the step time (5.4 M
  page faults in 200 steps, 10 s of system time; 17 steps/s with the input pipeline off, 41 with the
  settings below; 29 -> 35 with it on). Here blocks up to 32 MiB come from the heap, and up to 512 MiB
  of freed heap stays there between steps (the process keeps up to that much more memory resident).
  glibc's mmap threshold cannot go above 32 MiB, and the ERM step's temporaries (one block of 34-41
  MiB) are above it: mmap_max=0 keeps such blocks in the threads' heaps too (`make demo`: 12 M
  instead of 16-24 M page faults, 27-33 s instead of 39-57 s of system time, 2026-12-02). A thread's
  heap holds at most 64 MiB, so larger blocks (XLA's 121-147 MiB of a Concept-Tuning step) are still
  mmapped. glibc reads these settings (GLIBC_TUNABLES) only when a process starts, and mallopt()
  later reaches only some of its heaps, so the entry points start themselves again with them
  (`restart_with_malloc_settings`); `make test` sets them for the tests. Where the user set
  GLIBC_TUNABLES malloc settings, or on other systems, nothing changes. Tried and left out: every
  thread on the main heap (arena_max=1), which keeps the larger blocks too (0.7 M page faults in a
  300-step Concept-Tuning run instead of 9.7 M, 6.4 instead of 5.3 steps/s alone), but glibc's
  _int_malloc then took 9% of `make demo`'s CPU samples and the demo was slower (242 and 246 s
  against 233 and 227 s, 2026-12-02, back to back).
- JAX's persistent compilation cache, in $XDG_CACHE_HOME/concept_jax/xla (~/.cache/...) unless
  JAX_COMPILATION_CACHE_DIR names another place: the stages of a comparison compile the same steps
  (a fine-tune from the clean or the spurious source is one program), and a rerun compiles nothing.
  A fine-tuning stage of the benchmark takes 18 s instead of 24-28 s with the cache warm. It keeps
  at most 2 GiB (least recently used entries go; bounding it needs the filelock package), unless
  JAX_COMPILATION_CACHE_MAX_SIZE says otherwise (-1: no bound, as the tests run it).
"""
import os
import sys

MALLOC_TUNABLES = ('glibc.malloc.top_pad=268435456:glibc.malloc.mmap_threshold=33554432:'
                   'glibc.malloc.trim_threshold=536870912:glibc.malloc.mmap_max=0')
CACHE_MAX_BYTES = 2 << 30  # least recently used entries go first beyond this


def cpu_count() -> int:
  """The CPU cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def restart_with_malloc_settings() -> None:
  """Replaces this process by the same command with MALLOC_TUNABLES in GLIBC_TUNABLES (Linux, once)."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if not sys.platform.startswith('linux') or 'glibc.malloc' in tunables:
    return
  env = dict(os.environ, GLIBC_TUNABLES=':'.join(t for t in (tunables, MALLOC_TUNABLES) if t))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def persistent_compilation_cache() -> str:
  """Turns on JAX's compilation cache (compilations of at least 0.5 s); returns its directory."""
  import jax
  directory = jax.config.jax_compilation_cache_dir  # set from JAX_COMPILATION_CACHE_DIR, if given
  if not directory:
    home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    directory = os.path.join(home, 'concept_jax', 'xla')
    jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  if 'JAX_COMPILATION_CACHE_MAX_SIZE' not in os.environ:  # -1 there: no bound, no eviction scans
    # JAX's size bound needs filelock (a pinned dependency); where it is missing JAX turns the whole
    # cache off with only a warning, so its absence is an error here.
    import filelock  # noqa: F401
    jax.config.update('jax_compilation_cache_max_size', CACHE_MAX_BYTES)
  return directory
