package integration

import (
	"context"
	"testing"
	"time"

	"github.com/batonhq/baton/internal/backoff"
)

// TestDrainCutOffPastItsTTLStaysOutOfMembership: a node is cut off from
// etcd as its /admin/drain begins and reaches etcd again, its lease lost,
// while the drain still runs (the drain may take 10 s). server.Drain
// promises that a draining node never re-joins membership, even after
// etcd lost its lease; its membership key must not be written again.
// Found by TestRandomFaults' drain-cut steps (seed 1795948096965146111,
// g3 step 7 and g6 step 12; every drain-cut step of every run since).
//
// What happened (node log, BATON_NODE_LOG=info): "guard fired", then,
// once n1 reached etcd again, "lease lost, starting a new one": the
// session granted a fresh lease and its OnLease callback
// (coord.MembershipOnLease) wrote servers/n1 again, so peers and
// workers saw n1 as a live member until Drain's final revoke. A stopping
// node now never runs that callback (server's registerUnlessStopping).
func TestDrainCutOffPastItsTTLStaysOutOfMembership(t *testing.T) {
	c := newCluster(t, time.Second)
	c.args = []string{"-admin-token", randomAdminToken, "-balance=false"} // n1 takes every app it is asked for
	n1 := c.start("n1")
	c.start("n2")
	apps := c.register(3)
	c.ownAll(n1, apps)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	mw, err := c.watchMember(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}

	n1.partition(true)
	answer := make(chan drainAnswer, 1)
	go func() { answer <- c.adminDrain(ctx, n1) }()
	if _, err := c.waitDraining(ctx, n1, 5*time.Second); err != nil {
		n1.partition(false)
		t.Fatal(err)
	}
	// Past the 1 s TTL (etcd expires the lease), well within the drain's
	// 10 s.
	backoff.Sleep(ctx, 2500*time.Millisecond)
	n1.partition(false)
	ans := waitAnswer(ctx, answer, drainCtx+5*time.Second)
	t.Logf("n1: %s", ans)

	// The other server acts for every app; n1 acts for none.
	if _, err := c.check.waitOwned(apps, "", ttl+time.Second+slack); err != nil {
		t.Fatal(err)
	}
	waitEnds(t, c, "n1")
	key, _ := c.keys.Server("n1")
	for _, put := range mw.stop() {
		when := "after its drain answered"
		if ans.err != nil || put.seen.Before(ans.at) {
			when = "while its drain ran"
		}
		t.Errorf("draining n1 re-joined membership %s: %s written at revision %d, lease %x", when, key, put.rev, put.lease)
	}
	if resp, err := c.etcd.Client().Get(ctx, key); err != nil || len(resp.Kvs) > 0 {
		t.Errorf("n1's membership key after its drain: %v, %v", resp, err)
	}
	c.assertVerdict()
}
