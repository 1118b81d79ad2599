package election_test

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/batonhq/baton/internal/testutil"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, testutil.IgnoreHardStoppedEtcd)
}
