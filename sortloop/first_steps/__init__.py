"""First steps on a user's own photos: `sortloop start` (an archive where nothing is sorted yet)."""
