"""The relay: SMTP front door, message pipeline, rewriting, spool, delivery, config and CLI."""
