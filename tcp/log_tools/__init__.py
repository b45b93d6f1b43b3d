"""`tcp-log`: inspect, prune, compact, export and merge Mistake Logs (docs/mistake_log.md).

One module per job, each usable as a library:

- `errors`   one-line errors (`log error: ...`, `usage error: ...`); `args` flag parsers
- `checks`   what is a Mistake Log; errors for a path that is not one or a damaged one
- `paths`    the sibling paths a rewrite reserves (`<PATH>.tcp-compact`, ...)
- `tables`   per-entry facts of a log (steps, losses, sizes) read without decoding states
- `select`   prune policies: pure functions from those facts to keep-masks
- `rewrite`  copy chosen entries of one or more shards into a new store
- `swap`     exchange a verified new store with the original, and recover an interrupted swap
- `replace`  rewrite a log in place: lock, copy beside it, verify, swap (prune --apply, compact)
- `prune`, `compact`, `merge`, `export`, `summary`   the commands' library functions
- `cli`      the `tcp-log` command line
"""
