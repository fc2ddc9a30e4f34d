"""The pipeline's stages, one module each, run in order by refcal.train.run."""
