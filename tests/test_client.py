"""chat.client: the reconnect rule every client follows."""

import pytest

from chat.client import reconnect_delay


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (6, 10.0)],
)
def test_delay_is_full_jitter_below_a_doubling_ceiling_capped_at_10_s(attempt, ceiling):
    assert reconnect_delay(attempt, random=lambda: 0.0) == 0.0
    assert reconnect_delay(attempt, random=lambda: 0.5) == ceiling / 2
    assert reconnect_delay(attempt, random=lambda: 0.999) == pytest.approx(
        ceiling * 0.999
    )


def test_first_retry_after_1001_is_spread_over_2_s_later_ones_back_off():
    assert reconnect_delay(0, 1001, random=lambda: 0.75) == 1.5
    assert reconnect_delay(0, 1006, random=lambda: 0.75) == 0.375
    assert reconnect_delay(1, 1001, random=lambda: 0.75) == 0.75


def test_a_client_retrying_for_days_does_not_overflow():
    assert reconnect_delay(100_000, random=lambda: 0.5) == 5.0


def test_delays_of_many_clients_are_spread_not_in_lockstep():
    delays = [reconnect_delay(0, 1001) for _ in range(1000)]
    assert len(set(delays)) == 1000
    assert 0 <= min(delays) < 0.1 and 1.9 < max(delays) < 2.0
