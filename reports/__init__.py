"""What people read of a job: the progress bar, the report page, the estimate and the compare; built
from the job's state and files, never writing either."""
