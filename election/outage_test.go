package election_test

import (
	"context"
	"testing"
	"time"
)

// TestRecoversAfterEtcdWasEntirelyDown: every member stopped for twice
// the TTL, then restarted. The servers' leases may not survive (etcd
// persists a lease's remaining TTL, and it runs out), but every app must
// have an owner again soon after etcd is back.
func TestRecoversAfterEtcdWasEntirelyDown(t *testing.T) {
	c := newCluster(t, 3, 2*time.Second)
	a := c.addNode("a")
	c.addNode("b")
	apps := c.registerN(t, 5)
	electAll(t, c, a, apps)

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	done := make(chan error, 3)
	for i := range 3 {
		go func() { done <- c.etcd.Stop(i) }()
	}
	for range 3 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if !c.rec.wait(10*time.Second, func([]event) bool { return len(c.rec.owners()) == 0 }) {
		t.Fatalf("owners still acting with etcd down: %v", c.rec.owners())
	}
	select {
	case <-time.After(2 * c.ttl): // the outage
	case <-ctx.Done():
	}
	for i := range 3 {
		go func() { done <- c.etcd.Restart(ctx, i) }()
	}
	for range 3 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	back := time.Now()
	if !c.rec.wait(20*time.Second, func([]event) bool {
		owners := c.rec.owners()
		for _, app := range apps {
			if len(owners[app]) != 1 {
				return false
			}
		}
		return true
	}) {
		t.Fatalf("after etcd came back, owners are %v", c.rec.owners())
	}
	t.Logf("every app owned %v after etcd came back", time.Since(back))
	c.rec.expectClean(t)
}
