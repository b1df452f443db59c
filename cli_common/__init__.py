"""What every command of the toolkit shares, and nothing else: the leaf every package may import.

* `errors`: `UserError`, the base of every failure a user can fix, and its command-line kinds;
* `command`: the error contract (`run_main`, `guard_startup`) and the one argparse `Parser`
  with the argument types every command reuses;
* `outputs`: output paths judged before any work, atomic writes, file identity;
* `version`: the toolkit's version (package metadata) for `--version` and the files it writes;
* `jsonable`: numpy values -> JSON values, the one conversion for reports, metadata and results.

It needs only the standard library (and numpy for `jsonable`), so a command that fails on its
first flag has loaded neither torch nor h5py. It imports nothing of the project: the import
order is checked by tests/test_import_order.py.
"""
