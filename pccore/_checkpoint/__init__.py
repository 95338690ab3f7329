r"""Checkpoints of the full training state: stored with orbax-checkpoint, checked by pccore.

orbax-checkpoint does the storage (one directory `step_00000012/` per checkpoint), the
atomic commit (a `step_00000012.orbax-checkpoint-tmp` directory renamed into place once
every process has written its part), keep-N, asynchronous saves and the arrays of several
processes. pccore adds what a training run needs on top:

- a manifest (`manifest/manifest.json`): the step, the run's configuration, the pccore
    version, the model's framework, and the path, shape, dtype and SHA-256 of every saved
    leaf; arrays sit next to it in `state/`, one per leaf, named by their path
    (`model.params[0][0].weight`), a typed PRNG key as its key data;
- checks with messages that name the first damaged or mismatching parameter: a checkpoint
    is verified by reading its arrays and comparing their SHA-256 (orbax reads a flipped
    byte in an array's data back silently), and a template that does not fit is refused
    before anything is read;
- no lost checkpoint on `overwrite`: the old directory is set aside as `.old-NAME-*` until
    the new one is committed, and readers use it meanwhile;
- one writer per directory, an advisory `flock` held by process 0;
- reading pccore 0.1's checkpoints.

orbax-checkpoint is the `checkpoint` extra (`pip install "pccore[checkpoint]"`), imported
only when a checkpoint is written or read.

The modules: `_format` (what is saved, the manifest and its checks, the errors), `_files`
(`files.json`, the files' sizes and SHA-256), `_commit` (the writer lock and `overwrite`'s
set-aside), `_store` (one checkpoint: save, verify, restore), `_manager` (numbered
checkpoints, keep-N, asynchronous saves), `_legacy` (pccore 0.1).
"""
