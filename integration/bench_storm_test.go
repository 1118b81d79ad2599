package integration

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
)

// BenchmarkLeaderLossStorm: 1,000 watching workers of 10 apps (sharing 30
// etcd clients, ten on each member) lose etcd's leader together with a
// follower — the quorum — for 1.5 s. Every require-leader watch is
// cancelled at once and every client on a stopped member loses its
// connection; this is what makes workers fall back to HTTP together. It
// reports the HTTP requests the workers send to the servers from the
// moment of the loss for stormWindow: their total, their peak rate over
// 100 ms, and the time from etcd having a leader again until every
// worker watches again and points at its app's owner with its token. Run with -benchtime=3x.
func BenchmarkLeaderLossStorm(b *testing.B) {
	const workers, apps, clientsPerMember = 1000, 10, 10
	e := testutil.Etcd(b, 3)
	bc := newBenchClusterOn(b, e, 3)
	ids := registerMany(b, bc, apps)
	electAll(b, bc.nodes, ids)
	var clients []*clientv3.Client
	for i := range 3 * clientsPerMember {
		clients = append(clients, testutil.Client(b, e, e.Endpoint(i%3)))
	}
	counter := &requestCounter{next: http.DefaultTransport.(*http.Transport).Clone()}
	reg := prometheus.NewRegistry()
	f := startFleet(b, fleetConfig{
		N: workers, App: func(i int) string { return fmt.Sprintf("app-%d", i%apps) },
		Clients: clients, Servers: bc.addrs(), HTTPClient: &http.Client{Transport: counter}, Registerer: reg,
	})
	var totals, peaks, rewatch []float64
	for b.Loop() {
		if _, err := settledFleet(bc, f, reg, 30*time.Second); err != nil {
			b.Fatal("before the loss: ", err)
		}
		counter.reset()
		lost := time.Now()
		leader, err := e.Leader(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		members := []int{leader, (leader + 1) % 3}
		if err := forEach(members, e.Stop); err != nil {
			b.Fatal(err)
		}
		time.Sleep(time.Until(lost.Add(1500 * time.Millisecond))) // the outage itself
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err = forEach(members, func(i int) error { return e.Restart(ctx, i) })
		if err == nil {
			_, err = e.Leader(ctx)
		}
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		back := time.Now()
		settled, err := settledFleet(bc, f, reg, stormWindow)
		if err != nil {
			b.Fatal("after the loss: ", err)
		}
		time.Sleep(time.Until(lost.Add(stormWindow))) // the rest of the observed window
		total, peak := counter.since(lost)
		totals, peaks = append(totals, float64(total)), append(peaks, peak)
		rewatch = append(rewatch, settled.Sub(back).Seconds())
		b.Logf("etcd had a leader again %v after the loss; the fleet settled %v later; %d requests, peak %v/s %v after the loss",
			back.Sub(lost).Round(time.Millisecond), settled.Sub(back).Round(time.Millisecond), total, peak, counter.peakAt)
	}
	b.ReportMetric(median(totals), "http-requests")
	b.ReportMetric(median(peaks), "peak-req/s")
	b.ReportMetric(median(rewatch), "settled-s")
}

// stormWindow is how long after the loss requests are counted.
const stormWindow = 15 * time.Second

// settledFleet waits until every worker of f watches and points at its
// app's owner in etcd with that ownership's token, and says when.
func settledFleet(bc *benchCluster, f *fleet, reg *prometheus.Registry, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		why := unsettled(bc, f, reg)
		if why == "" {
			return time.Now(), nil
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("not settled after %v: %s", timeout, why)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func unsettled(bc *benchCluster, f *fleet, reg *prometheus.Registry) string {
	if w := testutil.Metric(bc.b, reg, "baton_worker_watching", ""); int(w) != len(f.ws) {
		return fmt.Sprintf("%v of %d workers watching", w, len(f.ws))
	}
	owners := map[int64]coord.OwnerRecord{}
	tokens := map[int64]int64{}
	for _, d := range f.ws {
		app := d.AppID()
		if _, ok := owners[app]; !ok {
			resp, err := bc.etcd.Client().Get(context.Background(), bc.keys.Owner(app))
			if err != nil || len(resp.Kvs) == 0 {
				return fmt.Sprintf("app %d has no owner key (%v)", app, err)
			}
			rec, err := coord.DecodeOwnerRecord(resp.Kvs[0].Value)
			if err != nil {
				return err.Error()
			}
			owners[app], tokens[app] = rec, resp.Kvs[0].ModRevision
		}
		cur, _ := d.Current()
		if cur.ServerID != owners[app].ServerID || cur.Token != tokens[app] {
			return fmt.Sprintf("a worker of app %d is at %+v, the owner is %s at token %d", app, cur, owners[app].ServerID, tokens[app])
		}
	}
	return ""
}

// requestCounter is an http.RoundTripper that stamps every request.
type requestCounter struct {
	next   http.RoundTripper
	mu     sync.Mutex
	at     []time.Time
	peakAt time.Duration // from the start given to since: the peak's 100 ms
}

func (c *requestCounter) RoundTrip(r *http.Request) (*http.Response, error) {
	c.mu.Lock()
	c.at = append(c.at, time.Now())
	c.mu.Unlock()
	return c.next.RoundTrip(r)
}

func (c *requestCounter) reset() {
	c.mu.Lock()
	c.at = nil
	c.mu.Unlock()
}

// since counts the requests sent since start and their highest rate over
// 100 ms, in requests per second.
func (c *requestCounter) since(start time.Time) (int, float64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	buckets := map[int64]int{}
	total, peak := 0, 0
	for _, at := range c.at {
		if at.Before(start) {
			continue
		}
		total++
		i := int64(at.Sub(start) / (100 * time.Millisecond))
		buckets[i]++
		if buckets[i] > peak {
			peak, c.peakAt = buckets[i], time.Duration(i)*100*time.Millisecond
		}
	}
	return total, float64(peak) * 10
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}
