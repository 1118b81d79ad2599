package coord_test

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
)

// Dialing an address where nothing listens fails with the dial error in
// about a second, not when the caller's ctx ends.
func TestDialFailsFastWhereNothingListens(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	cli, err := coord.Dial(ctx, []string{addr}, nil)
	took := time.Since(start)
	if err == nil {
		cli.Close()
		t.Fatal("Dial succeeded where nothing listens")
	}
	if !strings.Contains(err.Error(), "cannot reach etcd at") || !strings.Contains(err.Error(), "refused") {
		t.Errorf("Dial: %v; want it to say it cannot reach etcd, and why", err)
	}
	// About 1 s here; the bound only has to tell it from the ctx's 20 s.
	if took > 10*time.Second {
		t.Errorf("Dial took %v to give up", took)
	}
	t.Logf("gave up after %v: %v", took.Round(time.Millisecond), err)
}
