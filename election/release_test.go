package election_test

import (
	"context"
	"testing"
	"time"

	"github.com/batonhq/baton/internal/testutil"
)

// A HandOver or Resign whose write cannot reach etcd (a blip shorter than
// the TTL, so the lease and the key survive) leaves the key naming a
// server that has stopped acting, and that answers pings. The release is
// owed and paid in the background once etcd answers again: another
// server acts for the app within TTL + 1 s of the blip's end (found by
// review: before, nobody did).
func TestAReleaseThatFailedIsRetriedUntilItIsMade(t *testing.T) {
	for _, how := range []string{"HandOver", "Resign"} {
		t.Run(how, func(t *testing.T) {
			c := newCluster(t, 1, time.Second)
			a := c.addNodeTTL("a", 2*time.Second, viaProxy())
			c.addNode("b")
			app := c.register(t, "x")[0]
			electAll(t, c, a, []int64{app})

			justConfirmed(t, a)
			heal := c.cutOff(t, a)
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			var err error
			if how == "HandOver" {
				_, err = a.el.HandOver(ctx, app)
			} else {
				err = a.el.Resign(ctx, app)
			}
			cancel()
			if err == nil {
				t.Fatalf("%s with etcd unreachable succeeded", how)
			}
			heal()
			healed := time.Now()
			testutil.Eventually(t, 5*time.Second, "a's session to confirm again", func() bool { return a.session.Check() == nil })
			limit := a.session.TTL() + time.Second
			// The target is TTL + 1 s; a loaded machine gets a second more.
			if took, ok := ownedWithin(c, []int64{app}, limit+time.Second); !ok {
				owner, token := c.ownerOf(t, app)
				t.Errorf("%v after the blip healed nobody acts for the app; its key names %s (token %d)", limit+time.Second, owner, token)
			} else {
				t.Logf("another server acts for the app %v after the blip healed (%v after the wait began)", time.Since(healed).Round(time.Millisecond), took.Round(time.Millisecond))
			}
			if owner, _ := c.ownerOf(t, app); owner == "a" {
				t.Errorf("the key still names a")
			}
			c.rec.expectClean(t)
		})
	}
}

// ownedWithin waits until some server acts for every app in apps (one
// open acquire each), and reports how long that took or false.
func ownedWithin(c *cluster, apps []int64, d time.Duration) (time.Duration, bool) {
	start := time.Now()
	ok := c.rec.wait(d, func([]event) bool {
		owners := c.rec.owners()
		for _, app := range apps {
			if len(owners[app]) != 1 {
				return false
			}
		}
		return true
	})
	return time.Since(start), ok
}
