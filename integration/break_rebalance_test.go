package integration

import (
	"syscall"
	"testing"
	"time"
)

// PIN: process faults while servers rebalance (examples/node processes,
// -balance on, settle 1 s, 20%/s): n3 joins and n1 and n2 move its share
// to it; mid-round n1 is paused (SIGSTOP) past its TTL, and while it is
// recovering, n3 — the target — is killed (SIGKILL) and restarted. The
// checker finds no overlap (end stamps on CLOCK_MONOTONIC in each
// process), and every app ends with exactly one owner.
func TestBreakRebalanceProcessFaultsDuringARound(t *testing.T) {
	c := newCluster(t, ttl)
	c.args = []string{"-balance", "-rebalance-settle", "1s", "-rebalance-rate", "0.2"}
	n1 := c.start("n1")
	c.start("n2")
	apps := c.register(60)
	for _, app := range apps {
		if _, err := c.acquire(n1, app); err != nil {
			t.Fatalf("acquire %d: %v", app, err)
		}
	}
	if _, err := c.check.waitOwned(apps, "", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	n3 := c.start("n3")
	deadline := time.Now().Add(20 * time.Second)
	for {
		moved := 0
		for _, owners := range c.check.owners() {
			for _, s := range owners {
				if s == "n3" {
					moved++
				}
			}
		}
		if moved >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no app moved to n3")
		}
		select {
		case <-c.check.changes():
		case <-time.After(100 * time.Millisecond):
		}
	}
	n1.signal(syscall.SIGSTOP)
	<-time.After(ttl + ttl/2) // the pause's duration: past n1's lease
	n1.signal(syscall.SIGCONT)
	c.kill(n3) // during n1's recovery
	if _, err := c.check.waitOwned(apps, "n3", ttl+time.Second+slack); err != nil {
		t.Fatalf("after n3's crash: %v", err)
	}
	c.start("n3")
	if _, err := c.check.waitOwned(apps, "", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	c.assertVerdict()
}
