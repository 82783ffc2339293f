"""The declarative training pipeline: definition file, validator, stages and runner."""
