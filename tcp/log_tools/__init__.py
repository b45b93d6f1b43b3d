"""`tcp-log`: inspect, prune, compact, export and merge Mistake Logs (docs/mistake_log.md).

One module per job, each usable as a library:

- `errors`   one-line errors (`log error: ...`) and the checks that raise them
- `tables`   per-entry facts of a log (steps, losses, sizes) read without decoding states
- `select`   prune policies: pure functions from those facts to keep-masks
- `rewrite`  copy chosen entries of one or more shards into a new store
- `swap`     exchange a verified new store with the original, and recover an interrupted swap
- `replace`  rewrite a log in place: lock, copy beside it, verify, swap (prune --apply, compact)
- `prune`, `compact`, `merge`, `export`, `summary`   the commands' library functions
- `cli`      the `tcp-log` command line
"""
