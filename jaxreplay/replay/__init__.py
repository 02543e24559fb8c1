"""Where replay rows come from: real pretraining data or self-generated samples."""
