"""CUDA launch limits that the Triton interpreter does not enforce, for the tests to check."""

# Axis 0 up to 2^31 - 1 blocks, axes 1 and 2 up to 65,535, and no empty grid.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(name: str, grid) -> None:
    dims = tuple(grid) + (1,) * (3 - len(grid))
    for axis, (size, limit) in enumerate(zip(dims, GRID_LIMITS)):
        assert 1 <= size <= limit, f"{name}: grid {dims} axis {axis} = {size} is outside CUDA's [1, {limit}]"
