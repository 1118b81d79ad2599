package election_test

import (
	"context"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/testutil"
)

// TestAKeyWhoseReleaseIsInFlightIsNeverOwnedAgain: a hands X to b, and
// the handover's Txn is held in a's client — sent, as far as a knows, but
// not yet applied by etcd, as a request whose answer was lost may be.
// While it is held the resignation period ends, and then
//   - a worker asks a for X (Elect), or
//   - a's guard fires and confirms again (a new epoch: a owns again the
//     keys that still name it).
//
// X's key still names a under the token a gave up. a must not act for X
// under that token: the held Txn can reach etcd at any moment, and b acts
// as soon as its watch shows it (HandedOverFrom says a has stopped). Then
// the Txn goes out; b acts, a never acted for X again, and nobody
// overlapped. (Before released tokens were kept, a re-owned X under the
// old token in both cases, and both acted for X until a's watch caught
// up.)
func TestAKeyWhoseReleaseIsInFlightIsNeverOwnedAgain(t *testing.T) {
	for _, how := range []string{"a worker asks it", "its guard pauses"} {
		t.Run(how, func(t *testing.T) {
			c := newCluster(t, 1, time.Second)
			ids := c.registerN(t, 2)
			x, y := ids[0], ids[1]
			clock := newManualClock()
			var hook atomic.Pointer[func()]
			a := c.addNode("a", viaProxy(), withClient(ownerTxnHook(t, &hook, c.keys.Owner(x))),
				withConfig(func(cfg *election.Config) { election.SetClock(cfg, clock) }))
			b := c.addNode("b")
			electOn(t, c, a, x)
			electOn(t, c, a, y)
			for _, app := range ids {
				if who, _ := waitActing(t, c, app, 10*time.Second); who != "a" {
					t.Fatalf("app %d acts on %q; want a", app, who)
				}
			}
			_, token := c.ownerOf(t, x)

			held, release := make(chan struct{}), make(chan struct{})
			hold := func() { close(held); <-release }
			hook.Store(&hold)
			var released atomic.Bool
			free := func() {
				if !released.Swap(true) {
					close(release)
				}
			}
			t.Cleanup(free)
			handedTo := make(chan string, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				id, err := a.el.HandOver(ctx, x)
				if err != nil {
					t.Errorf("HandOver: %v", err)
				}
				handedTo <- id
			}()
			select {
			case <-held:
			case <-time.After(10 * time.Second):
				t.Fatal("the handover's Txn was never sent")
			}
			clock.Advance(3 * c.ttl) // the resignation period is over

			switch how {
			case "a worker asks it":
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				addr, err := a.el.Elect(ctx, x, coord.ProtocolHTTP, "")
				cancel()
				if err != nil || addr != b.addr {
					t.Errorf("Elect on a while its handover is in flight = %q, %v; want b, where X is going", addr, err)
				}
			case "its guard pauses":
				justConfirmed(t, a)
				heal := c.cutOff(t, a)
				testutil.Eventually(t, 5*time.Second, "a's guard to fire", func() bool { return a.session.Epoch().Err() != nil })
				heal()
				// Y's key is unchanged: a owns it again in the new epoch's
				// reclaim, the same pass that would take X back.
				ok := c.rec.wait(10*time.Second, func(events []event) bool {
					return len(acquisitionsOf(events, y)) == 2
				})
				if !ok {
					t.Fatalf("a did not take Y back after its guard confirmed again: %v", acquisitionsOf(c.rec.snapshot(), y))
				}
			}
			if o, owns := a.el.Ownership(x); owns {
				t.Errorf("a acts for X under token %d while its handover of token %d is in flight", o.Token, token)
			}

			free()
			select {
			case id := <-handedTo:
				if id != "b" {
					t.Errorf("HandOver returned %q; want b", id)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("HandOver did not return")
			}
			if who, _ := waitActing(t, c, x, 10*time.Second); who != "b" {
				t.Errorf("X acts on %q; want b", who)
			}
			acq := acquisitionsOf(c.rec.snapshot(), x)
			if n := len(slices.DeleteFunc(slices.Clone(acq), func(s string) bool { return s[0] != 'a' })); n != 1 {
				t.Errorf("a acquired X %d times; want once: %v", n, acq)
			}
			c.rec.expectClean(t)
		})
	}
}
