from shared.checkpoints.backoff import Backoff


def test_delays_double_up_to_the_cap():
    backoff = Backoff(0.1, 1.0)
    assert [backoff.next() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_reset_starts_again_from_the_first_delay():
    backoff = Backoff(0.1, 5.0)
    for _ in range(10):
        backoff.next()
    backoff.reset()
    assert backoff.next() == 0.1
