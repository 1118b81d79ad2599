package worker_test

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/keyspace"
)

// putOwner writes the app's owner key as a server would, naming serverID
// at addr, with no lease, and returns its ModRevision (the token). The
// worker only reads the key, so a test can move the owner at will.
func putOwner(t testing.TB, cli *clientv3.Client, app int64, serverID, addr string) int64 {
	t.Helper()
	keys, _ := keyspace.New("")
	rec, err := coord.OwnerRecord{
		ServerID:   serverID,
		Control:    coord.Endpoint{Address: addr},
		Protocols:  coord.Protocols{coord.ProtocolHTTP: {Address: addr}},
		TTLMillis:  1000,
		AcquiredAt: time.Now(),
	}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Put(ctx, keys.Owner(app), string(rec))
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

// watchStreams counts the etcd client watch streams (one goroutine each,
// watchGRPCStream.run) alive in this process.
func watchStreams() int {
	buf := make([]byte, 16<<20)
	n := runtime.Stack(buf, true)
	return strings.Count(string(buf[:n]), "(*watchGRPCStream).run(")
}

// waitStreams polls watchStreams until it is at most want or timeout
// passes, and returns the last count.
func waitStreams(want int, timeout time.Duration) int {
	deadline := time.After(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		n := watchStreams()
		if n <= want {
			return n
		}
		select {
		case <-tick.C:
		case <-deadline:
			return n
		}
	}
}
