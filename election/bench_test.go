package election_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
)

// reportLatencies reports the median and p99 of samples in milliseconds.
func reportLatencies(b *testing.B, prefix string, samples []time.Duration) {
	if len(samples) == 0 {
		return
	}
	slices.Sort(samples)
	pct := func(p float64) float64 {
		i := int(p * float64(len(samples)-1))
		return float64(samples[i].Microseconds()) / 1000
	}
	b.ReportMetric(pct(0.5), prefix+"p50-ms")
	b.ReportMetric(pct(0.99), prefix+"p99-ms")
}

// putBaseline measures n plain etcd puts on the cluster's client: the
// unit against which the other figures of the same run are read.
func putBaseline(b *testing.B, c *cluster, n int) time.Duration {
	var samples []time.Duration
	for i := 0; i < n; i++ {
		start := time.Now()
		if _, err := c.etcd.Client().Put(context.Background(), "/bench/put", "x"); err != nil {
			b.Fatal(err)
		}
		samples = append(samples, time.Since(start))
	}
	slices.Sort(samples)
	return samples[len(samples)/2]
}

// oneOwnedApp starts three electors and has the first own one app.
func oneOwnedApp(b *testing.B) (*cluster, int64) {
	c := newCluster(b, 1, 2*time.Second)
	for _, id := range []string{"s1", "s2", "s3"} {
		c.addNode(id)
	}
	app := c.register(b, "bench")[0]
	if _, err := c.nodes[0].el.Elect(context.Background(), app, coord.ProtocolHTTP, ""); err != nil {
		b.Fatal(err)
	}
	return c, app
}

// BenchmarkRevokeToNewOwner: the owner's lease is revoked from outside;
// time until the app's successor acts for it (its OnAcquire ran).
// Run with -benchtime=20x for the median of 20.
func BenchmarkRevokeToNewOwner(b *testing.B) {
	c, app := oneOwnedApp(b)
	ctx := context.Background()
	var samples []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		owner, _ := c.ownerOf(b, app)
		if owner == "" {
			b.Fatal("no owner")
		}
		n := c.node(owner)
		// Wait until the old owner's session has a fresh confirmed lease
		// again (it was revoked in the previous round), so it can be a
		// successor later.
		start := time.Now()
		if _, err := c.etcd.Client().Revoke(ctx, n.session.Lease()); err != nil {
			b.Fatal(err)
		}
		if !c.rec.wait(10*time.Second, func(ev []event) bool {
			for _, e := range ev {
				if e.kind == "acquire" && e.app == app && e.server != owner && e.at.After(start) {
					samples = append(samples, e.at.Sub(start))
					return true
				}
			}
			return false
		}) {
			b.Fatal("no new owner")
		}
		b.StopTimer()
		// Let the revoked node renew its lease and re-register before the
		// next round.
		waitMembers(b, c, 3)
		b.StartTimer()
	}
	b.StopTimer()
	reportLatencies(b, "", samples)
	b.ReportMetric(float64(putBaseline(b, c, 50).Microseconds())/1000, "put-p50-ms")
}

func waitMembers(b *testing.B, c *cluster, n int) {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		ok := true
		for _, m := range c.nodes {
			if len(m.el.Members().Servers()) != n || m.session.Check() != nil {
				ok = false
			}
		}
		if ok {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	b.Fatal("membership did not settle")
}

// BenchmarkHandOver: HandOver of an owned app until its successor owns
// it. Reports p50/p99 and the ratio of the median to a plain etcd put's.
func BenchmarkHandOver(b *testing.B) {
	c, app := oneOwnedApp(b)
	ctx := context.Background()
	var samples []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		owner, _ := c.ownerOf(b, app)
		n := c.node(owner)
		if !c.rec.wait(5*time.Second, func([]event) bool { _, ok := n.el.Token(app); return ok }) {
			b.Fatal("owner not acting")
		}
		start := time.Now()
		if _, err := n.el.HandOver(ctx, app); err != nil {
			b.Fatal(err)
		}
		samples = append(samples, time.Since(start))
	}
	b.StopTimer()
	reportLatencies(b, "", samples)
	put := putBaseline(b, c, 50)
	b.ReportMetric(float64(put.Microseconds())/1000, "put-p50-ms")
	slices.Sort(samples)
	b.ReportMetric(float64(samples[len(samples)/2])/float64(put), "x-put")
}
