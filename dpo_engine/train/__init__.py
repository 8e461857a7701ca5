"""Kernelized DPO training: config, tokenisation, the trainer loop, the run directory and the job entry point.

Import the pieces from their modules (dpo_engine.train.config, .trainer, .rundir); this package
imports nothing heavy so the job system can name `dpo_engine.train.job:run_train_job` cheaply.
"""
