"""Small pieces every layer uses: files written atomically (data prepare, checkpoints, exports)."""
