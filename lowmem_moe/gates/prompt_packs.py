"""Group prompts into packs that run through a decoder layer as one sequence."""

import bisect


def pack_prompts(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group prompt indices into packs of at most ``max_tokens`` tokens in all.

    Packing is best-fit decreasing: the longest prompts are placed first,
    each into the pack with the least room that still fits it. A prompt
    longer than ``max_tokens`` gets a pack of its own. Indices within a pack
    are in ascending order.
    """
    packs: list[list[int]] = []
    # (free tokens, pack index) of packs with room left, sorted.
    room: list[tuple[int, int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        position = bisect.bisect_left(room, (length, -1))
        if position < len(room):
            free, pack_index = room.pop(position)
            packs[pack_index].append(index)
        else:
            free, pack_index = max_tokens, len(packs)
            packs.append([index])
        if free - length > 0:
            bisect.insort(room, (free - length, pack_index))
    return [sorted(pack) for pack in packs]
