"""Pytree paths as tuples of names: how parameters are matched across checkpoints, transfers and
sharding rules ("params", "local", "out", "kernel")."""

import jax


def path_of(key_path) -> tuple[str, ...]:
  """A tree_util key path as a tuple of names ("params", "local", "out", "kernel")."""
  out = []
  for k in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def flat_paths(tree) -> dict:
  """{path tuple: leaf} of a pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_of(p): leaf for p, leaf in leaves}
