"""The training wing: `trainer` (the curriculum trainer, `train`, `TrainConfig`), `step` (the public one-call
`TrainState` / `train_step`), `pipeline` (grain: records -> per-epoch batches), `checkpoint` (orbax, checksums,
export) and `runlock` (one process per run folder). Device placement is `latent_jax.sharding.Placement`.
The old module names (`latent_jax.trainer`, `train_step`, `checkpoint`, `runlock`, `data.pipeline`) are aliases.
Nothing is imported here, so `import latent_jax.train.runlock` stays light (the CLI's start).
"""
